"""Tiny presets shared by the pipeline tests (small enough for 2 CPU cores)."""

from diffit_cli.config import load_preset

TINY_UNET = [
    "model.img_resolution=16", "data.resolution=16", "model.channels=[16, 16]", "model.blocks=[1, 1]",
    "model.window_size=[4, 4]", "model.head_dim=8", "model.time_dim=32", "model.mlp_ratio=2.0",
    "train.batch=8", "train.total_kimg=0.032", "train.report_kimg=0.008", "train.snapshot_kimg=0.016",
    "train.lr_rampup_kimg=0", "train.mixed_precision=fp32", "data.num_workers=0", "sample.steps=4",
    "sample.batch=8",
]

TINY_VIT = [
    "model.input_size=8", "data.resolution=64", "model.hidden_size=32", "model.depth=2", "model.num_heads=2",
    "model.num_classes=4", "train.batch=8", "train.total_kimg=0.016", "train.report_kimg=0.008",
    "train.snapshot_kimg=0.008", "train.mixed_precision=fp32", "data.num_workers=0", "sample.steps=4",
    "sample.sampler=ddpm", "sample.batch=4", "sample.cfg_scale=2.0",
]


def tiny_unet(*extra: str):
    return load_preset("demo", TINY_UNET + list(extra))


def tiny_vit(*extra: str):
    return load_preset("imagenet256", TINY_VIT + list(extra))
