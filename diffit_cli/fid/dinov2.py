"""FD-DINOv2's feature extractor: DINOv2 ViT-L/14 (Oquab et al. 2023) with EDM2's preprocessing (Karras et al.
2024), built without network.

EDM2's `DINOv2Detector` resizes each uint8 image to 224×224 with PIL's bicubic resampling (its reference mode, the
one that matches dgm-eval exactly; its fast mode, torch's antialiased bicubic, gives almost the same numbers),
divides by 255, normalises with ImageNet's mean and standard deviation and keeps DINOv2 ViT-L/14's output: the
final-norm CLS token, 1024 values. torch-fidelity's own `dinov2-vit-l-14` resizes with TF1-style bilinear
interpolation instead, so its numbers are not EDM2's; diffit registers this class under that name (and
`dinov2-vit-l14`), so every FD-DINOv2 in diffit uses EDM2's resize.

torch.hub would fetch the model's code from GitHub; `DinoViT` is a minimal ViT whose state-dict keys and
forward match the official `dinov2_vitl14` (no register tokens, LayerScale, qkv with bias, LayerNorm eps 1e-6,
position embeddings for 37×37 patches bicubically interpolated to the input's grid), so the official
`dinov2_vitl14_pretrain.pth` loads into it unchanged.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import PIL.Image
import torch
import torch.nn as nn
import torch.nn.functional as F

from diffit_cli.errors import DiffitError
from diffit_cli.fid.local_extractor import LocalFeatureExtractor

DINOV2 = "dinov2-vit-l-14"  # torch-fidelity's name
DINOV2_ALIASES = ("dinov2-vit-l14",)
DINOV2_URL = "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/dinov2_vitl14_pretrain.pth"
SIZE = 224
MEAN = (0.485, 0.456, 0.406)  # ImageNet's, as DINOv2 was trained with
STD = (0.229, 0.224, 0.225)


def dinov2_weights_cache_path() -> Path:
    """Where torch.hub keeps (and diffit looks for) the official checkpoint: <torch hub dir>/checkpoints/<file>."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(DINOV2_URL).path)


def edm2_preprocess(x: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) → float (B, 3, 224, 224) as EDM2 feeds DINOv2: PIL bicubic resize of the uint8 image
    (rounded back to uint8, as PIL does), /255, ImageNet mean/std."""
    arr = x.to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    resized = [
        np.asarray(PIL.Image.fromarray(a, "RGB").resize((SIZE, SIZE), PIL.Image.Resampling.BICUBIC)) for a in arr
    ]
    y = torch.from_numpy(np.stack(resized)).permute(0, 3, 1, 2).to(x.device).float() / 255
    mean = torch.tensor(MEAN, device=y.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=y.device).view(1, 3, 1, 1)
    return (y - mean) / std


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c))


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class _LayerScale(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), 1e-5))

    def forward(self, x):
        return x * self.gamma


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.attn, self.mlp = _Attention(dim, heads), _Mlp(dim, 4 * dim)
        self.ls1, self.ls2 = _LayerScale(dim), _LayerScale(dim)

    def forward(self, x):
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class _PatchEmbed(nn.Module):
    def __init__(self, patch: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch, stride=patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class DinoViT(nn.Module):
    """DINOv2's ViT; the defaults are ViT-L/14 (`dinov2_vitl14`: 24 blocks, 1024 wide, 16 heads, 37×37 position
    grid from its 518-pixel training). `forward` returns the final-norm CLS token (B, dim)."""

    def __init__(self, dim: int = 1024, depth: int = 24, heads: int = 16, patch: int = 14, grid: int = 37):
        super().__init__()
        self.patch, self.dim = patch, dim
        self.patch_embed = _PatchEmbed(patch, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid + 1, dim))
        self.mask_token = nn.Parameter(torch.zeros(1, dim))  # masked training only; kept so the checkpoint loads
        self.blocks = nn.ModuleList(_Block(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def _pos_embed(self, h: int, w: int) -> torch.Tensor:
        """DINOv2's `interpolate_pos_encoding`: bicubic, by the scale factor (grid + 0.1) / M (its offset 0.1)."""
        pos = self.pos_embed.float()
        m = int(math.sqrt(pos.shape[1] - 1))
        if (h, w) == (m, m):
            return self.pos_embed
        grid = pos[:, 1:].reshape(1, m, m, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, scale_factor=((h + 0.1) / m, (w + 0.1) / m), mode="bicubic")
        grid = grid.permute(0, 2, 3, 1).reshape(1, h * w, -1)
        return torch.cat([pos[:, :1], grid], dim=1).to(self.pos_embed.dtype)

    def forward(self, x):
        h, w = x.shape[-2] // self.patch, x.shape[-1] // self.patch
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1) + self._pos_embed(h, w)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)[:, 0]


def load_dinov2(path: Path) -> DinoViT:
    """ViT-L/14 with the official state dict at `path` (tensors only; a mismatch raises)."""
    model = DinoViT()
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    return model


class DinoV2FeatureExtractor(LocalFeatureExtractor):
    """torch-fidelity's interface around `DinoViT` with `edm2_preprocess`; feature `dinov2` (1024 values) serves
    FID (that is, FD-DINOv2), KID and precision/recall; IS is refused. Weights: `feature_extractor_weights_path`,
    else the torch hub cache, else downloaded there (`fid.extractors.check_weights_at_hand` refuses that offline)."""

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)
        self.model = self.build_model(feature_extractor_weights_path)
        self.requires_grad_(False)
        self.eval()

    def build_model(self, weights_path) -> nn.Module:
        if weights_path is None:
            if not dinov2_weights_cache_path().is_file():
                dinov2_weights_cache_path().parent.mkdir(parents=True, exist_ok=True)
                torch.hub.download_url_to_file(DINOV2_URL, str(dinov2_weights_cache_path()))
            weights_path = dinov2_weights_cache_path()
        return load_dinov2(Path(weights_path))

    @staticmethod
    def get_provided_features_list():
        return ("dinov2",)

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        if metric == "isc":  # softmax over self-supervised features is no class distribution
            raise DiffitError(
                f"IS needs a classifier's class probabilities, which {DINOV2} does not give; compute IS with "
                "--feature-extractor inception-v3-compat in a separate run"
            )
        return {"fid": "dinov2", "kid": "dinov2", "prc": "dinov2"}[metric]

    def forward(self, x):
        self.check_input(x)
        out = {"dinov2": self.model(edm2_preprocess(x)).float()}
        return tuple(out[name] for name in self.features_list)
