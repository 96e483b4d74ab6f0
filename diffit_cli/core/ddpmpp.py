"""DDPM++ U-Net (Song et al. 2021, in EDM's CIFAR-10 configuration) with plain or TMSA self-attention (Table 5).

Layout (EDM's ``SongUNet`` with the DDPM++ settings; written from the paper's description, not copied):
- time: positional (or Fourier) features of c_noise, `model_channels` wide → Linear → SiLU → Linear to
  `model_channels·channel_mult_emb`, then SiLU; augmentation labels add to the features, labels to the embedding;
- encoder: Conv3×3 in; per level a downsampling block (levels > 0) then `num_blocks` blocks;
- decoder: at the lowest level two blocks (the first with attention), elsewhere an upsampling block; then
  `num_blocks + 1` blocks, each concatenating one encoder output; GN → SiLU → Conv3×3 out (zero-init);
- block: GN → SiLU → [resample] Conv3×3 → + Linear(emb) → GN → SiLU → dropout → Conv3×3 (zero-init), skip
  (1×1 conv when the width or resolution changes), ×√½; then, at `attn_resolutions`, self-attention, ×√½.
  Encoder blocks at those resolutions all attend; decoder blocks attend in the last block of the level (and the
  first block of the lowest level), as in DDPM++. Resampling: 2×2 average pool / nearest ×2 (filter [1, 1]).
- attention "plain": GN → 1×1 qkv → softmax(q·kᵀ/√d)·v over all positions → 1×1 proj (zero-init), DDPM++'s;
  "tmsa": GN → tokens → global TMSA (layers.TMSA, window = the feature map) whose time token is the embedding.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import TMSA
from .layers import LabelEmbedder, TimestepEmbedder, init_rpb_and_time, time_token
from .unet import group_norm

ATTENTIONS = ("plain", "tmsa")


class PlainAttention(nn.Module):
    """DDPM++ self-attention over all positions (no relative position bias, no time)."""

    def __init__(self, channels: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, h: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        B, C, H, W = h.shape
        q, k, v = self.qkv(h).reshape(B, 3, self.num_heads, C // self.num_heads, H * W).unbind(1)  # (B, nh, d, N)
        out = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        return self.proj(out.transpose(-1, -2).reshape(B, C, H, W))


class TMSAAttention(nn.Module):
    """Global TMSA on the feature map: the block's time embedding is the time token (DiffiT Eq. 3–6)."""

    def __init__(self, channels: int, num_heads: int, emb_channels: int, resolution: int):
        super().__init__()
        self.attn = TMSA(channels, num_heads, emb_channels, resolution, time_mode="tmsa")

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        B, C, H, W = h.shape
        out = self.attn(h.flatten(2).transpose(1, 2), emb, (H, W))  # (B, HW, C)
        return out.transpose(1, 2).reshape(B, C, H, W)


class Block(nn.Module):
    """DDPM++ residual block with optional down/up-sampling and self-attention (module docstring)."""

    def __init__(
        self,
        c_in: int,
        c_out: int,
        emb_channels: int,
        *,
        down: bool = False,
        up: bool = False,
        attention: str | None = None,
        num_heads: int = 1,
        resolution: int = 0,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.down, self.up = down, up
        self.norm0 = group_norm(c_in)
        self.conv0 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.affine = nn.Linear(emb_channels, c_out)
        self.norm1 = group_norm(c_out)
        self.drop = nn.Dropout(dropout)
        self.conv1 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if (c_in != c_out or down or up) else None
        self.norm2 = group_norm(c_out) if attention else None
        if attention == "plain":
            self.attn = PlainAttention(c_out, num_heads)
        elif attention == "tmsa":
            self.attn = TMSAAttention(c_out, num_heads, emb_channels, resolution)
        else:
            self.attn = None

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        if self.down:
            return F.avg_pool2d(x, 2)
        if self.up:
            return F.interpolate(x, scale_factor=2.0, mode="nearest")
        return x

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv0(self._resample(F.silu(self.norm0(x))))
        h = h + self.affine(emb)[:, :, None, None].to(h.dtype)
        h = self.conv1(self.drop(F.silu(self.norm1(h))))
        skip = self._resample(x)
        x = (h + (self.skip(skip) if self.skip is not None else skip)) * math.sqrt(0.5)
        if self.attn is not None:
            x = (x + self.attn(self.norm2(x), emb)) * math.sqrt(0.5)
        return x


class DDPMpp(nn.Module):
    """DDPM++ (Table 5 baseline); forward(x, t = c_noise, y=None, augment_labels=None) -> (B, C, H, W)."""

    def __init__(
        self,
        img_resolution: int = 32,
        in_channels: int = 3,
        model_channels: int = 128,
        channel_mult=(2, 2, 2),
        channel_mult_emb: int = 4,
        num_blocks: int = 4,
        attn_resolutions=(16,),
        attention: str = "plain",
        num_heads: int = 1,
        dropout: float = 0.13,
        num_classes: int = 0,
        label_dropout: float = 0.0,
        augment_dim: int = 0,
        time_embedding: str = "positional",
    ):
        super().__init__()
        if attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {attention!r}")
        emb = model_channels * channel_mult_emb
        self.num_classes = num_classes
        self.t_embedder = TimestepEmbedder(emb, model_channels, time_embedding, augment_dim)
        self.y_embedder = LabelEmbedder(num_classes, emb, label_dropout) if num_classes else None
        kw = dict(emb_channels=emb, num_heads=num_heads, dropout=dropout)
        attn_res = set(attn_resolutions)

        self.conv_in = nn.Conv2d(in_channels, model_channels, 3, padding=1)
        self.enc = nn.ModuleList()
        skips, c = [model_channels], model_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level > 0:
                self.enc.append(Block(c, c, down=True, **kw))
                skips.append(c)
            for _ in range(num_blocks):
                a = attention if res in attn_res else None
                self.enc.append(Block(c, model_channels * mult, attention=a, resolution=res, **kw))
                c = model_channels * mult
                skips.append(c)
        self.dec = nn.ModuleList()
        self.dec_cat = []  # whether each decoder block takes a skip
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec.append(Block(c, c, attention=attention, resolution=res, **kw))
                self.dec.append(Block(c, c, **kw))
                self.dec_cat += [False, False]
            else:
                self.dec.append(Block(c, c, up=True, **kw))
                self.dec_cat.append(False)
            for idx in range(num_blocks + 1):
                a = attention if (idx == num_blocks and res in attn_res) else None
                self.dec.append(Block(c + skips.pop(), model_channels * mult, attention=a, resolution=res, **kw))
                c = model_channels * mult
                self.dec_cat.append(True)
        self.head = nn.Sequential(group_norm(c), nn.SiLU(), nn.Conv2d(c, in_channels, 3, padding=1))
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """EDM's DDPM++ scheme: xavier-uniform weights, zero biases, zero-init residual branches and head."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.xavier_uniform_(m.weight.view(m.weight.shape[0], -1))
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for m in self.modules():  # residual branches start near zero (EDM: init_weight 1e-5 on these)
            if isinstance(m, Block):
                nn.init.zeros_(m.conv1.weight)
            elif isinstance(m, PlainAttention):
                nn.init.zeros_(m.proj.weight)
            elif isinstance(m, TMSAAttention):
                nn.init.zeros_(m.attn.proj.weight)
        init_rpb_and_time(self)
        nn.init.zeros_(self.head[-1].weight)

    def checkpointable_blocks(self) -> list[nn.Module]:
        """The blocks activation checkpointing recomputes: every encoder and decoder block."""
        return [*self.enc, *self.dec]

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor | None = None,
        augment_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        emb = F.silu(time_token(self.t_embedder, self.y_embedder, t, y, augment_labels))  # (B, emb)
        h = self.conv_in(x)
        skips = [h]
        for block in self.enc:
            h = block(h, emb)
            skips.append(h)
        for block, cat in zip(self.dec, self.dec_cat):
            if cat:
                h = torch.cat([h, skips.pop()], dim=1)
            h = block(h, emb)
        return self.head(h)
