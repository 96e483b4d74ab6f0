"""Budgets: how a study is shrunk for a laptop (tiny, small) or run as the paper did (paper); each model kind
scales its own section."""

from __future__ import annotations

import copy
from dataclasses import dataclass

from diffit_cli.ablation.study import SYNTHETIC_CLASSES, StudyError
from diffit_cli.config.schema import MODEL_KINDS


@dataclass(frozen=True)
class Budget:
    """How a study is shrunk. `paper` changes nothing; the others rescale the resolved preset (see apply_budget)."""

    name: str
    summary: str
    width_div: int = 1  # network widths ÷ this (ratios between variants survive)
    head_dim: int | None = None
    resolution: int | None = None  # pixel resolution (latent presets become a pixel-space stand-in)
    max_stages: int | None = None
    max_blocks: int | None = None
    sizes: dict | None = None  # fixed sizes by model kind (vit: the isotropic ViT; encdec: ViT encoder / SETR-MLA)
    kimg: float | None = None  # total_kimg (else the preset's × kimg_scale)
    kimg_scale: float = 1.0
    batch: int | None = None
    samples: int | None = None  # generated images per FID
    reference_images: int | None = None  # training images behind the FID reference (None: all)
    steps: dict | None = None  # sampler name → steps
    synthetic: bool = False  # the built-in synthetic shapes
    ema_halflife_kimg: float | None = None
    fast: bool = False  # fp32, no dropout / augmentation / warm-up
    offline_extractor: bool = False  # fall back to the offline test extractor without Inception weights


_FEW_STEPS = {"heun": 8, "euler": 8, "dpmpp-2m": 8, "ddpm": 25, "ddim": 25}
BUDGETS: dict[str, Budget] = {
    "test": Budget(
        "test",
        "CI smoke test: seconds per study",
        width_div=16,
        head_dim=8,
        resolution=16,
        max_stages=2,
        max_blocks=1,
        sizes={
            "vit": dict(hidden_size=32, depth=2, num_heads=2, patch_size=2),
            "encdec": dict(vit_width=32, vit_depth=2, vit_heads=2, mla_channels=16),
        },
        kimg=0.048,
        batch=16,
        samples=24,
        reference_images=64,
        steps={"heun": 3, "euler": 3, "dpmpp-2m": 3, "ddpm": 4, "ddim": 4},
        synthetic=True,
        ema_halflife_kimg=0.01,
        fast=True,
        offline_extractor=True,
    ),
    "tiny": Budget(
        "tiny",
        "2 CPU cores, minutes per study: widths ÷ 8, 16×16 built-in shapes, 20 kimg, FID of 512 samples",
        width_div=8,
        head_dim=8,
        resolution=16,
        max_stages=2,
        max_blocks=1,
        sizes={
            "vit": dict(hidden_size=64, depth=4, num_heads=4, patch_size=2),
            "encdec": dict(vit_width=64, vit_depth=4, vit_heads=4, mla_channels=32),
        },
        kimg=20.0,
        batch=32,
        samples=512,
        reference_images=2048,
        steps=_FEW_STEPS,
        synthetic=True,
        ema_halflife_kimg=0.5,
        fast=True,
        offline_extractor=True,
    ),
    "small": Budget(
        "small",
        "one GPU, hours per variant: widths ÷ 2, 10 % of the preset's training, FID-10K",
        width_div=2,
        kimg_scale=0.1,
        samples=10_000,
    ),
    "paper": Budget("paper", "the paper's setting: the preset's widths, training and FID-50K"),
}
PUBLIC_BUDGETS = ("tiny", "small", "paper")


def get_budget(name: str) -> Budget:
    if name not in BUDGETS:
        raise StudyError(f"unknown budget {name!r}; choose one of {', '.join(PUBLIC_BUDGETS)}")
    return BUDGETS[name]


def apply_budget(raw: dict, b: Budget) -> dict:
    """Shrink a raw preset dict to budget `b` (after the variant's overrides, so variant ratios survive)."""
    raw = copy.deepcopy(raw)
    m, data, tr, sm, ev = (raw.setdefault(k, {}) for k in ("model", "data", "train", "sample", "eval"))
    kind = m.get("kind")
    if b.synthetic:
        data.update(path=None, synthetic=data.get("synthetic") or "varied", num_workers=0)
        if data.get("space") == "latent":  # pixel-space stand-in for the latent model
            data.update(space="pixel", vae=None, channels=3, xflip=False)
            m["in_channels"] = 3
            ev["reference"] = "train"  # the stand-in's own training shapes, not the latent model's file
        if m.get("num_classes", 0):
            m["num_classes"] = SYNTHETIC_CLASSES
            data["use_labels"] = True
    old_res = m.get("img_resolution", m.get("input_size"))
    if b.resolution:
        data["resolution"] = b.resolution
        m["input_size" if kind == "vit" else "img_resolution"] = b.resolution
    if kind in MODEL_KINDS:  # each model section scales itself
        MODEL_KINDS[kind].scale(
            m,
            b.width_div,
            head_dim=b.head_dim,
            max_stages=b.max_stages,
            max_blocks=b.max_blocks,
            old_resolution=old_res,
            sizes=(b.sizes or {}).get(kind),
        )
    if b.fast:
        if "dropout" in m:
            m["dropout"] = 0.0
        tr.update(mixed_precision="fp32", augment_p=0.0, lr_rampup_kimg=0.0)
    kimg = b.kimg if b.kimg is not None else float(tr["total_kimg"]) * b.kimg_scale
    tr["total_kimg"] = kimg
    if b.kimg is None and b.kimg_scale != 1.0:
        for key in ("lr_rampup_kimg", "ema_halflife_kimg"):
            if tr.get(key):
                tr[key] = float(tr[key]) * b.kimg_scale
        for key in ("report_kimg", "snapshot_kimg"):
            if tr.get(key):
                tr[key] = min(float(tr[key]), kimg)
    if b.kimg is not None:
        tr.update(report_kimg=kimg / 4, snapshot_kimg=kimg)
    if b.batch:
        tr.update(batch=b.batch, batch_gpu=None)
    if b.ema_halflife_kimg is not None:
        tr.update(ema_halflife_kimg=b.ema_halflife_kimg, ema_rampup_ratio=0.05, ema_decay=None)
    if b.samples:
        ev["num_samples"] = sm["num_images"] = b.samples
        sm["batch"] = min(int(sm.get("batch", 64)), b.samples)
    if b.steps:
        sm["steps"] = b.steps.get(sm.get("sampler", "heun"), sm.get("steps", 18))
    return raw
