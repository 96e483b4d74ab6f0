"""Latent DiffiT (DiffiT App. H.2; docs/paper.md, 'Latent network'): isotropic DiT-style ViT with global TMSA,
in the official release's state-dict layout."""

from __future__ import annotations

import torch
import torch.nn as nn

from .attention import check_time_mode
from .layers import DiffiTBlock, LabelEmbedder, TimestepEmbedder, init_rpb_and_time, modulate, time_token

# Named sizes as in DiT (depth, hidden, heads) × patch 2/4/8; "XL/2" is the release's DiffiT-XL/2 (docs/paper.md).
_DIT_WIDTHS = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
LATENT_SIZES: dict[str, dict[str, int]] = {
    f"{name}/{p}": {"depth": d, "hidden_size": h, "num_heads": nh, "patch_size": p}
    for name, (d, h, nh) in _DIT_WIDTHS.items()
    for p in (2, 4, 8)
}


def sincos_pos_embed_2d(embed_dim: int, grid_size: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding, MAE/DiT/release convention -> (grid², D)."""

    def one_d(dim: int, pos: torch.Tensor) -> torch.Tensor:  # (M,) -> (M, dim): sin half then cos half
        omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
        out = pos.reshape(-1)[:, None] * omega[None]
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)

    coords = torch.arange(grid_size, dtype=torch.float64)
    grid_w, grid_h = torch.meshgrid(coords, coords, indexing="xy")  # release: np.meshgrid(w, h), w first
    emb = torch.cat([one_d(embed_dim // 2, grid_w), one_d(embed_dim // 2, grid_h)], dim=1)  # (T, D)
    return emb.float()


class PatchEmbed(nn.Module):
    """Conv patch embedding `x_embedder.proj` (release layout): (B, C, H, W) -> (B, T, D)."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, D, h, w) -> (B, T, D)


class FinalLayer(nn.Module):
    """LayerNorm (no affine) → SiLU → Linear to p²·C_out (release); with adaLN (Fig. 7b) DiT's modulated head."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int, adaln: bool = False):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size)) if adaln else None

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        if self.adaLN_modulation is not None:
            shift, scale = self.adaLN_modulation(c).unsqueeze(1).chunk(2, dim=-1)
            return self.linear(modulate(self.norm_final(x), shift, scale))
        return self.linear(nn.functional.silu(self.norm_final(x)))  # (B, T, p²·C_out)


class LatentDiffiT(nn.Module):
    """Latent DiffiT-XL/2 and friends (docs/paper.md, 'Latent network'):
    c = t_emb + y_emb is the time token of every global TMSA block.

    forward(x (B, C, H, W), t (B,) DDPM step, y (B,) int64 with index num_classes = null) -> (B, 2C or C, H, W).
    """

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        learn_sigma: bool = True,
        time_mode: str = "tmsa",
    ):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} is not a multiple of patch_size {patch_size}")
        self.input_size, self.patch_size, self.in_channels = input_size, patch_size, in_channels
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.learn_sigma, self.num_classes = learn_sigma, num_classes
        self.time_mode = check_time_mode(time_mode)
        self.grid = input_size // patch_size  # the TMSA window is the whole grid: global attention (DiffiT Sec. 5.7)

        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size, 256)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid**2, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList(
            DiffiTBlock(hidden_size, num_heads, hidden_size, self.grid, mlp_ratio, time_mode) for _ in range(depth)
        )
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels, adaln=time_mode == "adaln")
        self.initialize_weights()

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, p²·C) -> (B, C, H, W)."""
        p, g, c = self.patch_size, self.grid, self.out_channels
        x = x.reshape(x.shape[0], g, g, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, g * p, g * p)

    def initialize_weights(self) -> None:
        """Release initialisation (docs/paper.md, 'Latent network'): xavier linears / zero bias, sin-cos pos_embed,
        N(0,.02) embeddings, zero final linear, trunc-normal RPB; ablation extras: adaLN zero, time-bias maps
        trunc-normal."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        self.pos_embed.data.copy_(sincos_pos_embed_2d(self.pos_embed.shape[-1], self.grid).unsqueeze(0))
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        init_rpb_and_time(self)
        if self.final_layer.adaLN_modulation is not None:
            nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
            nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def checkpointable_blocks(self) -> list[nn.Module]:
        """The blocks activation checkpointing recomputes: every DiffiT block."""
        return list(self.blocks)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x = self.x_embedder(x) + self.pos_embed  # (B, T, D)
        c = time_token(self.t_embedder, self.y_embedder, t, y)  # (B, D): the time token x_t
        for block in self.blocks:
            x = block(x, c, (self.grid, self.grid))
        return self.unpatchify(self.final_layer(x, c))  # (B, C_out, H, W)
