"""torch-fidelity's feature-extractor interface for the networks diffit builds itself (the offline stand-in and
FD-DINOv2's ViT): uint8 (B, 3, H, W) images in, no torch.compile."""

from __future__ import annotations

import torch
from torch_fidelity.feature_extractor_base import FeatureExtractorBase


class LocalFeatureExtractor(FeatureExtractorBase):
    """What the locally built extractors share: their input check and torch-fidelity's compile hooks (off)."""

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 3, 8, 8, dtype=torch.uint8)

    @staticmethod
    def check_input(x) -> None:
        if not (torch.is_tensor(x) and x.dtype == torch.uint8 and x.dim() == 4 and x.shape[1] == 3):
            raise ValueError("expecting a uint8 tensor of shape (B, 3, H, W)")
