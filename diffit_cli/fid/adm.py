"""The ADM evaluator's conventions for Inception Score and precision/recall, and the release's published table.

ADM (Dhariwal & Nichol 2021) scores ImageNet samples with its own evaluator (openai/guided-diffusion,
`evaluations/evaluator.py`), and every later ImageNet table (DiT, SiT, MDT, DiffiT's release) quotes its numbers.
Its definitions differ from torch-fidelity's in ways that move the digits the tables print:

- **Inception Score**: the softmax of the pool features times the classifier's weights, *without* its bias
  (torch-fidelity's `logits_unbiased` layer is that product), cut **in order** into consecutive splits of 5,000
  (50,000 samples: 10 splits; a remainder forms a last, smaller split), exp of the mean KL divergence between each
  sample's class distribution and its split's marginal, averaged over splits. torch-fidelity instead shuffles the
  samples (seeded) into 10 equal splits, so the same features give a slightly different number.
- **Precision/recall** (Kynkäänniemi et al. 2019, with k = 3): each set's manifold is the union of balls around its
  points whose radius is the distance to the point's 3rd nearest neighbour in its own set (the point itself
  excluded). Precision is the share of samples inside the reference manifold, recall the share of reference points
  inside the sample manifold; a point on a ball's boundary is inside. ADM works with *squared* distances, computed
  in blocks of 10,000 × 10,000 rows from features cast to float16, each block recomputed in float32 when any of
  its float16 distances overflows; the float16 rounding decides points near a boundary, so it is kept here.
  torch-fidelity computes the distances in float32.

ADM's reference batches (`VIRTUAL_imagenet256_labeled.npz`, `VIRTUAL_imagenet512.npz`) hold the full training
set's `mu`/`sigma` and 10,000 reference images (`arr_0`); precision/recall use those images' pool features.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from diffit_cli.errors import DiffitError
from diffit_cli.fid.extractors import exact_convolutions
from diffit_cli.fid.inputs import Statistics

PROTOCOLS = ("auto", "adm", "torch-fidelity")
ADM, TORCH_FIDELITY = "adm", "torch-fidelity"
IS_SPLIT_SIZE = 5000
NEIGHBOURHOOD = 3
DISTANCE_BLOCK = 10_000


# ----------------------------------------------------------------------------------------------
# Inception Score


def inception_score(logits: torch.Tensor, split_size: int = IS_SPLIT_SIZE) -> tuple[float, float]:
    """ADM's Inception Score of `logits` (N × classes, the unbiased logits): consecutive splits of `split_size`
    in the samples' order, exp(mean KL(p(y|x) ‖ p(y))) per split; the mean over splits (ADM's number) and their
    standard deviation (float64 throughout)."""
    if len(logits) < 1:
        raise DiffitError("the Inception Score needs at least 1 sample")
    log_p = torch.log_softmax(logits.double(), dim=1)
    scores = []
    for start in range(0, len(log_p), split_size):
        part = log_p[start : start + split_size]
        log_marginal = torch.logsumexp(part, dim=0) - np.log(len(part))
        kl = (part.exp() * (part - log_marginal)).sum(dim=1).mean()
        scores.append(float(kl.exp()))
    return float(np.mean(scores)), float(np.std(scores))


# ----------------------------------------------------------------------------------------------
# Precision / recall


def _fp16_round(x: torch.Tensor) -> torch.Tensor:
    return x.half().float()


def squared_distances(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances between the rows of `u` and `v` as ADM computes them: ‖u‖² − 2u·v + ‖v‖²
    (clamped at 0) from float16 features, each step's result rounded to float16 (the squares too; sums and products
    accumulated in float32, as GPU half-precision kernels do); where any of them overflows, the block in float32
    instead."""
    u16, v16 = _fp16_round(u.float()), _fp16_round(v.float())
    norm_u = _fp16_round(_fp16_round(u16 * u16).sum(1))[:, None]
    norm_v = _fp16_round(_fp16_round(v16 * v16).sum(1))[None, :]
    cross = _fp16_round(2 * _fp16_round(u16 @ v16.T))
    d = _fp16_round(_fp16_round(norm_u - cross) + norm_v).clamp_min(0)
    if torch.isfinite(d).all():
        return d
    u32, v32 = u.float(), v.float()
    return ((u32 * u32).sum(1)[:, None] - 2 * (u32 @ v32.T) + (v32 * v32).sum(1)[None, :]).clamp_min(0)


def manifold_radii(features: torch.Tensor, k: int = NEIGHBOURHOOD, block: int = DISTANCE_BLOCK) -> torch.Tensor:
    """Each point's squared distance to its k-th nearest neighbour in its own set (itself, at distance 0, is the
    0-th), from blocks of `block` × `block` distances."""
    n = len(features)
    radii = torch.empty(n, dtype=torch.float32, device=features.device)
    for r0 in range(0, n, block):
        rows = features[r0 : r0 + block]
        nearest = torch.cat(
            [
                torch.topk(
                    squared_distances(rows, features[c0 : c0 + block]), min(k + 1, min(block, n - c0)), 1, False
                )[0]
                for c0 in range(0, n, block)
            ],
            dim=1,
        )
        radii[r0 : r0 + block] = torch.sort(nearest, dim=1)[0][:, k]
    return radii


def precision_recall(
    samples: torch.Tensor, reference: torch.Tensor, k: int = NEIGHBOURHOOD, block: int = DISTANCE_BLOCK
) -> dict:
    """ADM's precision and recall of `samples` against `reference` (rows are features; both on one device)."""
    if samples.shape[1] != reference.shape[1]:
        raise DiffitError(
            f"precision/recall: {samples.shape[1]}-dim sample features, {reference.shape[1]}-dim reference"
        )
    if min(len(samples), len(reference)) < k + 1:
        raise DiffitError(f"precision/recall need at least {k + 1} samples and {k + 1} reference images (k = {k})")
    with exact_convolutions():  # float32 products stay float32 on GPUs that would use TF32
        r_ref, r_samples = manifold_radii(reference, k, block), manifold_radii(samples, k, block)
        samples_in = torch.zeros(len(samples), dtype=torch.bool, device=samples.device)
        reference_in = torch.zeros(len(reference), dtype=torch.bool, device=reference.device)
        for r0 in range(0, len(reference), block):
            for c0 in range(0, len(samples), block):
                d = squared_distances(reference[r0 : r0 + block], samples[c0 : c0 + block])
                samples_in[c0 : c0 + block] |= (d <= r_ref[r0 : r0 + block, None]).any(0)
                reference_in[r0 : r0 + block] |= (d <= r_samples[None, c0 : c0 + block]).any(1)
    return {"precision": float(samples_in.double().mean()), "recall": float(reference_in.double().mean())}


# ----------------------------------------------------------------------------------------------
# Which protocol, and the release's table


def is_adm_batch(ref) -> bool:
    """An ADM reference batch: a statistics file with `mu`/`sigma` and reference images (`arr_0`) that names no
    extractor (files written by `save_reference` name theirs)."""
    return isinstance(ref, Statistics) and ref.images is not None and ref.extractor is None


def choose_protocol(protocol: str | None, ref) -> str:
    """`adm` or `torch-fidelity`: as asked, or for `auto` ADM's when the reference is an ADM batch."""
    protocol = (protocol or "auto").strip().lower()
    if protocol not in PROTOCOLS:
        raise DiffitError(f"--protocol {protocol!r}: choose {', '.join(PROTOCOLS)}")
    if protocol == "auto":
        return ADM if is_adm_batch(ref) else TORCH_FIDELITY
    return protocol


@dataclass(frozen=True)
class ReleaseTable:
    """The numbers a released model reports with ADM's evaluator against one of ADM's reference batches."""

    name: str
    file_name: str
    resolution: int
    values: dict
    source: str


RELEASE_TABLES = (
    ReleaseTable(
        "ImageNet-256",
        "VIRTUAL_imagenet256_labeled.npz",
        256,
        {"fid": 1.73, "is_mean": 276.49, "sfid": 4.54, "precision": 0.8024, "recall": 0.6205},
        "DiffiT release (NVlabs/DiffiT README), ADM evaluator, 50K samples; docs/paper.md",
    ),
    ReleaseTable(
        "ImageNet-512",
        "VIRTUAL_imagenet512.npz",
        512,
        {"fid": 2.67, "is_mean": 252.13, "sfid": 4.99, "precision": 0.8277, "recall": 0.5500},
        "DiffiT release (NVlabs/DiffiT README), ADM evaluator, 50K samples; docs/paper.md",
    ),
)
ADM_BATCH_IMAGES = 10_000


def release_table(ref) -> ReleaseTable | None:
    """The release's table for an ADM ImageNet-256/512 reference batch: by its file name, or an ADM batch of
    10,000 images at 256² or 512²."""
    if not isinstance(ref, Statistics):
        return None
    name = Path(ref.path).name
    for table in RELEASE_TABLES:
        if name == table.file_name:
            return table
    if is_adm_batch(ref) and ref.images.count == ADM_BATCH_IMAGES:
        first = next(ref.images.batches(1))
        for table in RELEASE_TABLES:
            if first.shape[1:3] == (table.resolution, table.resolution):
                return table
    return None


def published_beside(result: dict, table: ReleaseTable, comparable: bool) -> dict:
    """The release's values beside the measured ones: {metric: {release, measured, difference}} for every metric
    both have; the difference only where the numbers are `comparable` (Inception features, 50K samples, ADM's
    protocol), as `ablate` prints none at a smaller budget."""
    rows = {}
    for key, published in table.values.items():
        measured = result.get(key)
        if measured is None:
            continue
        rows[key] = {
            "release": published,
            "measured": measured,
            "difference": measured - published if comparable else None,
        }
    return {"table": table.name, "source": table.source, "comparable": comparable, "metrics": rows}
