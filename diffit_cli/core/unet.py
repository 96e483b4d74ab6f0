"""Image-space DiffiT (DiffiT Sec. 3.2, Fig. 4, App. I.1): DiffiT ResBlocks in a symmetric U-shaped
encoder/decoder with windowed TMSA.

Design choices where the paper leaves a gap (docs/paper.md, 'Open choices'):
- downsampling: stride-2 Conv3×3; upsampling: nearest ×2 then Conv3×3 (paper: "convolutional"); both keep width.
- skips: every encoder stage output is concatenated onto the decoder input at the same resolution, then the
  decoder stage's opening Conv3×3 maps it back to the stage width (concatenation + conv). The lowest
  stage is the bottleneck and feeds the decoder directly (Tables S.2/S.3: the decoder starts with an upsampler).
- a stage whose width differs from the incoming one opens with a Conv3×3 that matches the feature maps.
- GroupNorm uses gcd(32, C) groups (32 at paper widths); dropout sits in each block's MLP hidden layer.
- time token: positional (or Fourier) features of c_noise with channels[0] frequencies → Linear → SiLU → Linear
  to time_dim (EDM's noise_channels = model_channels); label embedding and augment labels add to it.
Tensors run channels-last (NHWC memory) so the token view of a feature map is free.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import check_time_mode
from .layers import DiffiTBlock, LabelEmbedder, TimestepEmbedder, init_rpb_and_time, time_token


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm that normalises channels-last CPU tensors in contiguous memory: PyTorch's channels-last CPU
    kernel is 4-10× slower in the backward pass (bf16 under autocast; measured on a 2-core AVX-512 CPU)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
            return super().forward(x.contiguous()).contiguous(memory_format=torch.channels_last)
        return super().forward(x)


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with 32 groups (as DDPM/EDM), fewer when the width is not a multiple of 32."""
    return GroupNorm(math.gcd(32, channels), channels, eps=1e-6)


class ResBlock(nn.Module):
    """DiffiT ResBlock (DiffiT Eq. 9–10): x̂ = Conv3×3(Swish(GN(x))); out = DiffiTBlock(x̂, x_t) + x."""

    def __init__(
        self,
        channels: int,
        num_heads: int,
        time_dim: int,
        window_size: int,
        mlp_ratio: float,
        dropout: float,
        time_mode: str,
    ):
        super().__init__()
        self.norm = group_norm(channels)
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.block = DiffiTBlock(channels, num_heads, time_dim, window_size, mlp_ratio, time_mode, dropout)

    def forward(self, x: torch.Tensor, x_t: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.conv(F.silu(self.norm(x)))  # (B, C, H, W)
        tokens = self.block(h.permute(0, 2, 3, 1).reshape(B, H * W, C), x_t, (H, W))  # (B, HW, C)
        return tokens.view(B, H, W, C).permute(0, 3, 1, 2) + x  # back to (B, C, H, W), channels-last memory


class Downsample(nn.Module):
    """Stride-2 Conv3×3 (DiffiT Sec. 3.2 "convolutional down-sampling"): (B, C, H, W) -> (B, C, H/2, W/2)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest ×2 then Conv3×3 (DiffiT Sec. 3.2 "convolutional up-sampling"): (B, C, H, W) -> (B, C, 2H, 2W)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Stage(nn.Module):
    """One U-Net resolution (DiffiT Sec. 3.2), shared with the Table 4 baselines. Encoder: [Downsample] → [Conv3×3 width
    match]; decoder (`up`): Upsample → concat skip → Conv3×3 to the width. Then `depth` blocks made by `block()`."""

    def __init__(
        self,
        c_in: int,
        c: int,
        depth: int,
        block: Callable[[], nn.Module],
        *,
        down: bool = False,
        up: bool = False,
        c_skip: int = 0,
    ):
        super().__init__()
        if down:
            self.down = Downsample(c_in)
        if up:
            self.up = Upsample(c_in)
        c_cat = c_in + c_skip
        self.proj = nn.Conv2d(c_cat, c, 3, padding=1) if c_cat != c or up else nn.Identity()
        self.blocks = nn.ModuleList(block() for _ in range(depth))

    def forward(self, x: torch.Tensor, x_t: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        if hasattr(self, "down"):
            x = self.down(x)
        if hasattr(self, "up"):
            x = self.up(x)
        x = self.proj(x if skip is None else torch.cat([x, skip], dim=1))  # (B, c_in + c_skip, H, W) -> (B, c, H, W)
        for block in self.blocks:
            x = block(x, x_t)
        return x


class ImageDiffiT(nn.Module):
    """Image-space DiffiT (docs/paper.md, 'Image-space network'):
    tokenizer → encoder stages → decoder stages with skips → GN/SiLU/Conv head.

    forward(x (B, C, H, W), t (B,) = c_noise, y (B,) int64 or None, augment_labels (B, A) or None) -> (B, C_out, H, W).
    Head count per stage = channels // head_dim. The head conv is zero-initialised, so the output is 0 at init.
    C_out = C unless `out_channels` says otherwise (EDM's SongUNet: out_channels = img_channels).
    """

    def __init__(
        self,
        img_resolution: int = 32,
        in_channels: int = 3,
        out_channels: int | None = None,
        channels=(128, 256, 256),
        blocks=(2, 2, 2),
        window_size=(4, 4, 4),
        head_dim: int = 32,
        time_dim: int = 512,
        mlp_ratio: float = 4.0,
        dropout: float = 0.13,
        num_classes: int = 0,
        label_dropout: float = 0.0,
        augment_dim: int = 0,
        time_mode: str = "tmsa",
        time_embedding: str = "positional",
    ):
        super().__init__()
        channels, blocks = tuple(channels), tuple(blocks)
        n = len(channels)
        windows = (window_size,) * n if isinstance(window_size, int) else tuple(window_size)
        if not (len(blocks) == len(windows) == n) or n == 0:
            raise ValueError("channels, blocks and window_size need one entry per stage")
        self.img_resolution, self.num_classes = img_resolution, num_classes
        self.time_mode = check_time_mode(time_mode)
        kw = dict(time_dim=time_dim, mlp_ratio=mlp_ratio, dropout=dropout, time_mode=time_mode)
        res = [img_resolution // 2**i for i in range(n)]
        windows = tuple(min(w, r) for w, r in zip(windows, res))  # a window never exceeds the feature map
        for i, (c, r, w) in enumerate(zip(channels, res, windows)):
            if c % head_dim or r * 2**i != img_resolution or r % w:
                raise ValueError(f"stage {i}: width {c} vs head_dim {head_dim}, resolution {r} vs window {w}")
        self.windows = windows

        self.t_embedder = TimestepEmbedder(time_dim, channels[0], time_embedding, augment_dim)
        self.y_embedder = LabelEmbedder(num_classes, time_dim, label_dropout) if num_classes else None
        self.tokenizer = nn.Conv2d(in_channels, channels[0], 3, padding=1)

        def res_block(i: int) -> Callable[[], nn.Module]:
            return lambda: ResBlock(channels[i], channels[i] // head_dim, window_size=windows[i], **kw)

        self.enc = nn.ModuleList(
            Stage(channels[max(i - 1, 0)], channels[i], blocks[i], res_block(i), down=i > 0) for i in range(n)
        )
        self.dec = nn.ModuleList(
            Stage(channels[i + 1], channels[i], blocks[i], res_block(i), up=True, c_skip=channels[i])
            for i in reversed(range(n - 1))
        )
        out_channels = in_channels if out_channels is None else out_channels
        self.head = nn.Sequential(
            group_norm(channels[0]), nn.SiLU(), nn.Conv2d(channels[0], out_channels, 3, padding=1)
        )
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Initialisation following the release's scheme (`init_linears_and_conditioning`), RPB trunc-normal .02,
        adaLN zero, zero-init head conv (output 0 at init)."""
        init_linears_and_conditioning(self)
        init_rpb_and_time(self)
        nn.init.zeros_(self.head[-1].weight)
        nn.init.zeros_(self.head[-1].bias)

    def time_token(
        self, t: torch.Tensor, y: torch.Tensor | None = None, augment_labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        return time_token(self.t_embedder, self.y_embedder, t, y, augment_labels)

    def checkpointable_blocks(self) -> list[nn.Module]:
        """The blocks activation checkpointing recomputes: every DiffiT ResBlock."""
        return [b for stage in (*self.enc, *self.dec) for b in stage.blocks]

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor | None = None,
        augment_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x_t = self.time_token(t, y, augment_labels)
        h = self.tokenizer(x.contiguous(memory_format=torch.channels_last))  # (B, C0, H, W)
        skips = []
        for stage in self.enc:
            h = stage(h, x_t)
            skips.append(h)
        skips.pop()  # the bottleneck output is `h` itself
        for stage in self.dec:
            h = stage(h, x_t, skips.pop())
        return self.head(h)  # (B, C_out, H, W)


def init_linears_and_conditioning(model: nn.Module) -> None:
    """The release's scheme for image-space networks: xavier linears / zero bias, conv biases zero, time-MLP weights
    N(0, .02); the label table N(0, 1) as EDM's `map_label` (the paper is silent on image-space labels, EDM is its
    source there; the latent model keeps the release's .02). With .02 a small class-conditional model ignores its
    labels for a long time: the demo's grid columns were random shapes after 90 kimg, and are the right classes with
    unit-scale rows. The model has `t_embedder` and `y_embedder` (or None)."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Conv2d) and m.bias is not None:
            nn.init.zeros_(m.bias)
    nn.init.normal_(model.t_embedder.mlp[0].weight, std=0.02)
    nn.init.normal_(model.t_embedder.mlp[2].weight, std=0.02)
    if model.y_embedder is not None:
        nn.init.normal_(model.y_embedder.embedding_table.weight, std=1.0)
