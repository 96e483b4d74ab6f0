"""DiffiT building blocks (DiffiT Sec. 3.2, Eq. 3–8): time/label embeddings, the time token, the MLP and the DiffiT
block around TMSA (`attention`).

Pure torch. Token tensors are (B, N, C) in raster order of an (H, W) grid; the time token x_t is (B, time_dim).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import TMSA, check_time_mode

TIME_EMBEDDINGS = ("positional", "fourier")


# ----------------------------------------------------------------------------------------------- time / label
def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (B,) t: cos half then sin half, max period 1e4 (release, DiT) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, 2·half)
    return F.pad(emb, (0, dim % 2))


class FourierEmbedding(nn.Module):
    """Random Fourier features of t (EDM's FourierEmbedding, scale 16), the Table 8 alternative -> (B, dim)."""

    def __init__(self, dim: int, scale: float = 16.0):
        super().__init__()
        self.register_buffer("freqs", torch.randn(dim // 2) * scale)  # persistent: part of the model

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        args = t.float()[:, None] * (2 * math.pi * self.freqs.float())[None]  # (B, dim/2)
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, dim)


class TimestepEmbedder(nn.Module):
    """Time token x_t: frequency features of t → Linear → SiLU → Linear (DiffiT Sec. 3.2; release keys `mlp.{0,2}`).

    `kind` picks positional (default) or Fourier features (Table 8). With `augment_dim` > 0, a bias-free linear
    map of EDM's augmentation labels is added to the frequency features before the MLP (as EDM's `map_augment`).
    """

    def __init__(
        self, hidden_size: int, frequency_embedding_size: int = 256, kind: str = "positional", augment_dim: int = 0
    ):
        super().__init__()
        if kind not in TIME_EMBEDDINGS:
            raise ValueError(f"time embedding must be one of {TIME_EMBEDDINGS}, got {kind!r}")
        self.frequency_embedding_size = frequency_embedding_size
        self.kind = kind
        if kind == "fourier":
            self.fourier = FourierEmbedding(frequency_embedding_size)
        self.map_augment = nn.Linear(augment_dim, frequency_embedding_size, bias=False) if augment_dim else None
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )

    def forward(self, t: torch.Tensor, augment_labels: torch.Tensor | None = None) -> torch.Tensor:
        if self.kind == "fourier":
            freq = self.fourier(t)
        else:
            freq = timestep_embedding(t, self.frequency_embedding_size)  # (B, F)
        if self.map_augment is not None and augment_labels is not None:
            freq = freq + self.map_augment(augment_labels.to(freq.dtype))
        return self.mlp(freq)  # (B, hidden)


class LabelEmbedder(nn.Module):
    """Class embedding with a learned null class at index `num_classes` and label dropout for CFG (release).

    Training-time dropout (probability `dropout_prob`, global torch RNG) applies when `train` is True, or when
    `train` is None and the module is in training mode. `force_drop_ids` (B,) == 1 drops chosen labels.
    """

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)  # row num_classes = null class
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(self, labels: torch.Tensor, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Replace a random (or forced) subset of labels with the null class."""
        if force_drop_ids is None:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop = force_drop_ids == 1
        return torch.where(drop, torch.full_like(labels, self.num_classes), labels)

    def forward(
        self, labels: torch.Tensor, train: bool | None = None, force_drop_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        train = self.training if train is None else train
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)  # (B, hidden)


def time_token(
    t_embedder: nn.Module,
    y_embedder: nn.Module | None,
    t: torch.Tensor,
    y: torch.Tensor | None = None,
    augment_labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """x_t = MLP(emb(t) + A·augment_labels) + label embedding (null class when y is None): (B, time_dim).
    docs/paper.md, 'Time token'."""
    x_t = t_embedder(t, augment_labels)
    if y_embedder is not None:
        if y is None:
            y = torch.full((t.shape[0],), y_embedder.num_classes, dtype=torch.long, device=t.device)
        x_t = x_t + y_embedder(y)
    return x_t


# --------------------------------------------------------------------------------------------- DiffiT block
def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """DiT adaLN modulation x·(1+scale)+shift (Fig. 7b baseline); shift/scale are (B, 1, C)."""
    return x * (1 + scale) + shift


class Mlp(nn.Module):
    """Linear → GELU(tanh) → Linear, ratio 4 (release); `temb` adds x_t to the hidden layer (Table 6 G)."""

    def __init__(self, dim: int, hidden: int, time_dim: int | None = None, dropout: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, dim)
        self.temb = nn.Linear(time_dim, hidden) if time_dim else None

    def forward(self, x: torch.Tensor, x_t: torch.Tensor | None = None) -> torch.Tensor:
        h = self.fc1(x)  # (B, N, hidden)
        if self.temb is not None:
            h = h + self.temb(x_t).unsqueeze(1).to(h.dtype)
        return self.fc2(self.drop(self.act(h)))


class DiffiTBlock(nn.Module):
    """DiffiT transformer block, pre-LN (DiffiT Eq. 7–8): x̂ = x + TMSA(LN(x), x_t); out = x̂ + MLP(LN(x̂)).

    LayerNorms have no affine parameters (eps 1e-6). time_mode "adaln" swaps TMSA for DiT adaLN-Zero (Fig. 7b).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        time_dim: int,
        window_size: int,
        mlp_ratio: float = 4.0,
        time_mode: str = "tmsa",
        dropout: float = 0.0,
    ):
        super().__init__()
        self.time_mode = check_time_mode(time_mode)
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = TMSA(dim, num_heads, time_dim, window_size, time_mode)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), time_dim if time_mode == "mlp" else None, dropout)
        if time_mode == "adaln":
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(time_dim, 6 * dim))

    def forward(self, x: torch.Tensor, x_t: torch.Tensor, hw: tuple[int, int] | None = None) -> torch.Tensor:
        if self.time_mode == "adaln":
            mod = self.adaLN_modulation(x_t).unsqueeze(1).chunk(6, dim=-1)  # 6 × (B, 1, C)
            x = x + mod[2] * self.attn(modulate(self.norm1(x), mod[0], mod[1]), None, hw)
            return x + mod[5] * self.mlp(modulate(self.norm2(x), mod[3], mod[4]))
        x = x + self.attn(self.norm1(x), x_t, hw)
        return x + self.mlp(self.norm2(x), x_t)


def init_rpb_and_time(module: nn.Module) -> None:
    """Post-xavier fixes shared by both networks: RPB tables and time-bias maps trunc-normal 0.02, adaLN zero."""
    for m in module.modules():
        if isinstance(m, TMSA):
            nn.init.trunc_normal_(m.relative_position_bias_table, std=0.02)
            if m.time_mode == "bias":
                nn.init.trunc_normal_(m.rpb_temb.weight, std=0.02)
                nn.init.zeros_(m.rpb_temb.bias)
        elif isinstance(m, DiffiTBlock) and m.time_mode == "adaln":
            nn.init.zeros_(m.adaLN_modulation[-1].weight)
            nn.init.zeros_(m.adaLN_modulation[-1].bias)
