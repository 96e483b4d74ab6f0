"""DiffiT Table 4 encoder/decoder baselines: ViT / multi-resolution / DiffiT encoders × SETR-MLA / multi-resolution
/ DiffiT decoders, in one network, :class:`EncoderDecoder`.

Table 4 builds DiffiT up from a ViT: A = ViT-Base encoder + SETR-MLA decoder, B = multi-resolution encoder + SETR-MLA,
C = multi-resolution encoder + multi-resolution decoder, D = DiffiT encoder + multi-resolution decoder, E = DiffiT.
In A–D "the time component is adaptively scaled and added" to the spatial features instead of entering attention.
Design choices where the paper is silent (documented ASSUMPTIONs):

- adaptive time conditioning = scale-and-shift of the normalised features, h·(1 + s(x_t)) + b(x_t), two vectors
  per block (as AdaGN in DDPM++/ADM): before the conv of a multi-resolution block (GroupNorm), before the
  attention of a ViT block (LayerNorm), and after the first conv of each SETR-MLA stream;
- a multi-resolution block is a DiffiT ResBlock with the time moved out of attention: x̂ = Conv3×3(SiLU(AdaGN(x)));
  out = PlainBlock(x̂) + x, where PlainBlock is the DiffiT transformer block with windowed attention (same relative
  position bias) that sees no time token;
- the ViT encoder: p×p patch embedding, fixed 2-D sin-cos positions, `vit_depth` global-attention blocks; SETR-MLA
  taps 4 evenly spaced blocks (the last one included);
- SETR-MLA (Zheng et al. 2021): 1×1 lateral convs to `mla_channels`, top-down aggregation (each stream adds the
  coarser one, resized), per stream Conv3×3 → AdaGN → SiLU → Conv3×3 to half width, bilinear resize to the image
  resolution, concatenation, GN → SiLU → Conv3×3 head. With a multi-resolution encoder the taps are its stage outputs.
- the U-shaped parts (stages, skips, down/up-sampling, tokenizer, head) are ImageDiffiT's (core/unet.py).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import TMSA, check_time_mode
from .layers import LabelEmbedder, Mlp, TimestepEmbedder, init_rpb_and_time, time_token
from .unet import ResBlock, Stage, group_norm, init_linears_and_conditioning
from .vit import sincos_pos_embed_2d

ENCODERS = ("vit", "multires", "diffit")
DECODERS = ("setr-mla", "multires", "diffit")


class AdaptiveScaleShift(nn.Module):
    """h·(1 + s(x_t)) + b(x_t) with (s, b) from SiLU(x_t) → Linear (zero-init): the baselines' time conditioning."""

    def __init__(self, time_dim: int, channels: int):
        super().__init__()
        self.map = nn.Linear(time_dim, 2 * channels)

    def forward(self, h: torch.Tensor, x_t: torch.Tensor, channel_dim: int = 1) -> torch.Tensor:
        scale, shift = self.map(F.silu(x_t)).chunk(2, dim=-1)  # (B, C) each
        shape = [h.shape[0]] + [1] * (h.dim() - 1)
        shape[channel_dim] = -1
        return h * (1 + scale.view(shape).to(h.dtype)) + shift.view(shape).to(h.dtype)


class PlainBlock(nn.Module):
    """Pre-LN transformer block, windowed attention with relative position bias and **no** time token.

    `adaptive` adds AdaptiveScaleShift on the attention input (the ViT baseline's time path)."""

    def __init__(
        self, dim: int, num_heads: int, window: int, mlp_ratio: float, dropout: float, time_dim: int | None = None
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = TMSA(dim, num_heads, time_dim or 1, window, time_mode="mlp")  # "mlp": no time inside attention
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), None, dropout)
        self.ada = AdaptiveScaleShift(time_dim, dim) if time_dim else None

    def forward(self, x: torch.Tensor, x_t: torch.Tensor | None, hw: tuple[int, int]) -> torch.Tensor:
        h = self.norm1(x)
        if self.ada is not None:
            h = self.ada(h, x_t, channel_dim=-1)
        x = x + self.attn(h, None, hw)
        return x + self.mlp(self.norm2(x))


class AdaResBlock(nn.Module):
    """Multi-resolution block: x̂ = Conv3×3(SiLU(AdaGN(x, x_t))); out = PlainBlock(x̂) + x (time never in attention)."""

    def __init__(
        self,
        channels: int,
        num_heads: int,
        time_dim: int,
        window_size: int,
        mlp_ratio: float,
        dropout: float,
        time_mode: str = "tmsa",
    ):
        super().__init__()
        self.norm = group_norm(channels)
        self.ada = AdaptiveScaleShift(time_dim, channels)
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.block = PlainBlock(channels, num_heads, window_size, mlp_ratio, dropout)

    def forward(self, x: torch.Tensor, x_t: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.conv(F.silu(self.ada(self.norm(x), x_t)))  # (B, C, H, W)
        tokens = self.block(h.permute(0, 2, 3, 1).reshape(B, H * W, C), None, (H, W))
        return tokens.view(B, H, W, C).permute(0, 3, 1, 2) + x


def _block(kind: str, c: int, heads: int, window: int, **kw) -> Callable[[], nn.Module]:
    """A DiffiT ResBlock (TMSA) for `diffit`, else the adaptive multi-resolution block."""
    return lambda: (ResBlock if kind == "diffit" else AdaResBlock)(c, heads, window_size=window, **kw)


class ViTEncoder(nn.Module):
    """Isotropic ViT (Table 4 A): patch embed + sin-cos positions + global PlainBlocks with adaptive time.

    Returns the outputs of 4 evenly spaced blocks as maps (B, D, H/p, W/p), shallow first."""

    def __init__(
        self,
        in_channels: int,
        img_resolution: int,
        patch_size: int,
        width: int,
        depth: int,
        heads: int,
        time_dim: int,
        mlp_ratio: float,
        dropout: float,
    ):
        super().__init__()
        self.grid = img_resolution // patch_size
        self.patch = nn.Conv2d(in_channels, width, patch_size, stride=patch_size)
        self.register_buffer("pos_embed", sincos_pos_embed_2d(width, self.grid).unsqueeze(0), persistent=False)
        self.blocks = nn.ModuleList(
            PlainBlock(width, heads, self.grid, mlp_ratio, dropout, time_dim) for _ in range(depth)
        )
        n = min(4, depth)
        self.taps = sorted({round(depth * (k + 1) / n) - 1 for k in range(n)})
        self.out_channels = [width] * len(self.taps)

    def forward(self, x: torch.Tensor, x_t: torch.Tensor) -> list[torch.Tensor]:
        h = self.patch(x).flatten(2).transpose(1, 2) + self.pos_embed.to(x.dtype)  # (B, T, D)
        g, feats = self.grid, []
        for i, block in enumerate(self.blocks):
            h = block(h, x_t, (g, g))
            if i in self.taps:
                feats.append(h.transpose(1, 2).reshape(h.shape[0], -1, g, g))
        return feats


class SETRMLA(nn.Module):
    """SETR multi-level aggregation decoder over feature maps (shallow → deep, any resolutions) → (B, C_out, H, W)."""

    def __init__(self, in_channels: list[int], mla: int, out_channels: int, img_resolution: int, time_dim: int):
        super().__init__()
        half = max(mla // 2, 1)
        self.img_resolution = img_resolution
        self.lateral = nn.ModuleList(nn.Conv2d(c, mla, 1) for c in in_channels)
        self.conv1 = nn.ModuleList(nn.Conv2d(mla, mla, 3, padding=1) for _ in in_channels)
        self.norm = nn.ModuleList(group_norm(mla) for _ in in_channels)
        self.ada = nn.ModuleList(AdaptiveScaleShift(time_dim, mla) for _ in in_channels)
        self.conv2 = nn.ModuleList(nn.Conv2d(mla, half, 3, padding=1) for _ in in_channels)
        self.head = nn.Sequential(
            group_norm(half * len(in_channels)),
            nn.SiLU(),
            nn.Conv2d(half * len(in_channels), out_channels, 3, padding=1),
        )

    def forward(self, feats: list[torch.Tensor], x_t: torch.Tensor) -> torch.Tensor:
        lat = [conv(f) for conv, f in zip(self.lateral, feats)]
        for i in reversed(range(len(lat) - 1)):  # top-down: each stream adds the (resized) deeper one
            lat[i] = lat[i] + F.interpolate(lat[i + 1], size=lat[i].shape[-2:], mode="bilinear", align_corners=False)
        size = (self.img_resolution, self.img_resolution)
        streams = []
        for i, h in enumerate(lat):
            h = F.silu(self.ada[i](self.norm[i](self.conv1[i](h)), x_t))
            h = self.conv2[i](h)
            streams.append(F.interpolate(h, size=size, mode="bilinear", align_corners=False))
        return self.head(torch.cat(streams, dim=1))


class EncoderDecoder(nn.Module):
    """Table 4 network: `encoder` ∈ vit | multires | diffit, `decoder` ∈ setr-mla | multires | diffit.

    forward(x (B, C, H, W), t (B,) = c_noise, y (B,) or None, augment_labels (B, A) or None) -> (B, C, H, W),
    the same call as ImageDiffiT; the output conv is zero-initialised (output 0 at init).
    """

    def __init__(
        self,
        encoder: str = "multires",
        decoder: str = "multires",
        img_resolution: int = 32,
        in_channels: int = 3,
        channels=(128, 256, 256),
        blocks=(2, 2, 2),
        window_size=(4, 4, 4),
        head_dim: int = 32,
        time_dim: int = 512,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        num_classes: int = 0,
        label_dropout: float = 0.0,
        augment_dim: int = 0,
        time_mode: str = "tmsa",
        time_embedding: str = "positional",
        patch_size: int = 2,
        vit_depth: int = 12,
        vit_width: int = 768,
        vit_heads: int = 12,
        mla_channels: int = 256,
    ):
        super().__init__()
        if encoder not in ENCODERS or decoder not in DECODERS:
            raise ValueError(f"encoder must be one of {ENCODERS} and decoder one of {DECODERS}")
        if encoder == "vit" and decoder != "setr-mla":
            raise ValueError("a ViT encoder pairs with the setr-mla decoder")
        check_time_mode(time_mode)
        channels, blocks = tuple(channels), tuple(blocks)
        n = len(channels)
        windows = (window_size,) * n if isinstance(window_size, int) else tuple(window_size)
        res = [img_resolution // 2**i for i in range(n)]
        windows = tuple(min(w, r) for w, r in zip(windows, res))
        self.encoder_kind, self.decoder_kind = encoder, decoder
        self.img_resolution, self.num_classes = img_resolution, num_classes
        kw = dict(time_dim=time_dim, mlp_ratio=mlp_ratio, dropout=dropout, time_mode=time_mode)
        stages = dict(channels=channels, blocks=blocks, windows=windows, head_dim=head_dim, kw=kw)

        self.t_embedder = TimestepEmbedder(time_dim, channels[0], time_embedding, augment_dim)
        self.y_embedder = LabelEmbedder(num_classes, time_dim, label_dropout) if num_classes else None
        if encoder == "vit":
            self.tokenizer = None
            self.vit = ViTEncoder(
                in_channels, img_resolution, patch_size, vit_width, vit_depth, vit_heads, time_dim, mlp_ratio, dropout
            )
            feat_channels = self.vit.out_channels
        else:
            self.tokenizer = nn.Conv2d(in_channels, channels[0], 3, padding=1)
            self.enc = self._stages(encoder, **stages, up=False)
            feat_channels = list(channels)
        if decoder == "setr-mla":
            self.mla = SETRMLA(feat_channels, mla_channels, in_channels, img_resolution, time_dim)
        else:
            self.dec = self._stages(decoder, **stages, up=True)
            self.head = nn.Sequential(
                group_norm(channels[0]), nn.SiLU(), nn.Conv2d(channels[0], in_channels, 3, padding=1)
            )
        self.initialize_weights()

    @staticmethod
    def _stages(kind: str, channels, blocks, windows, head_dim: int, kw: dict, up: bool) -> nn.ModuleList:
        """The encoder's stages (down, finest first) or the decoder's (up, coarsest first, with skips) of `kind`."""
        if not up:
            return nn.ModuleList(
                Stage(
                    channels[max(i - 1, 0)],
                    channels[i],
                    blocks[i],
                    _block(kind, channels[i], channels[i] // head_dim, windows[i], **kw),
                    down=i > 0,
                )
                for i in range(len(channels))
            )
        return nn.ModuleList(
            Stage(
                channels[i + 1],
                channels[i],
                blocks[i],
                _block(kind, channels[i], channels[i] // head_dim, windows[i], **kw),
                up=True,
                c_skip=channels[i],
            )
            for i in reversed(range(len(channels) - 1))
        )

    def initialize_weights(self) -> None:
        """ImageDiffiT's scheme: xavier linears, zero biases, N(0, .02) time MLP, zero-init conditioning maps and
        output conv (so every baseline starts from output 0 and unconditioned features)."""
        init_linears_and_conditioning(self)
        for m in self.modules():
            if isinstance(m, AdaptiveScaleShift):
                nn.init.zeros_(m.map.weight)
        init_rpb_and_time(self)
        out = self.mla.head[-1] if self.decoder_kind == "setr-mla" else self.head[-1]
        nn.init.zeros_(out.weight)
        nn.init.zeros_(out.bias)

    def time_token(
        self, t: torch.Tensor, y: torch.Tensor | None = None, augment_labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        return time_token(self.t_embedder, self.y_embedder, t, y, augment_labels)

    def checkpointable_blocks(self) -> list[nn.Module]:
        """The blocks activation checkpointing recomputes: the ViT encoder's and every stage's blocks."""
        stages = [*getattr(self, "enc", []), *getattr(self, "dec", [])]
        return [*(self.vit.blocks if self.tokenizer is None else []), *(b for s in stages for b in s.blocks)]

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor | None = None,
        augment_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x_t = self.time_token(t, y, augment_labels)
        if self.tokenizer is None:
            feats = self.vit(x, x_t)
        else:
            h, feats = self.tokenizer(x.contiguous(memory_format=torch.channels_last)), []
            for stage in self.enc:
                h = stage(h, x_t)
                feats.append(h)
        if self.decoder_kind == "setr-mla":
            return self.mla(feats, x_t)
        h, skips = feats[-1], feats[:-1]
        for stage in self.dec:
            h = stage(h, x_t, skips.pop())
        return self.head(h)
