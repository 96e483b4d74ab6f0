"""Sample-quality metrics through torch-fidelity: FID, IS, KID, precision/recall, reference statistics.

Inputs are uint8 images from an image folder (searched recursively), an EDM `dataset_tool` zip, an
ADM-style `.npz` (`arr_0`, uint8 NHWC; read in batches, never loaded whole) or an in-memory uint8
NHWC array. A reference is any of those or a **statistics file** (`.npz` with `mu`, `sigma`):

- EDM reference files (`cifar10-32x32.npz`, `ffhq-64x64.npz`): `mu`, `sigma` of the full training set.
- ADM reference batches (`VIRTUAL_imagenet256_labeled.npz`): `mu`, `sigma` of the full training set
  (used for FID, as the ADM evaluator does) plus `arr_0`, 10,000 reference *images* whose features
  feed KID and precision/recall, and `mu_s`/`sigma_s`, the full training set's statistics of the spatial
  features behind sFID (`fid.extractors.SpatialTap`: the first 7 channels of Inception's `mixed_6/conv`).
- Files written by :func:`save_reference`: `mu`, `sigma`, `extractor`, `feature_layer`,
  `num_images`, `mu_s`/`sigma_s`/`spatial_layer`, and optionally `features` (per-image features, for KID and
  precision/recall).

Both published families were computed with the TensorFlow Inception-v3 graph of 2015-12-05
(`pool_3`, 2048 features; EDM through its TorchScript port of that graph). torch-fidelity's
`inception-v3-compat` extractor is a PyTorch port of the same graph, TF1-style bilinear resize to
299 included, and reproduces those features to float precision, so FID against these files is
comparable; small device- and precision-dependent differences remain (cuDNN TF32 is switched off
while features are extracted). The Fréchet distance (FID, sFID) is `fid.frechet.frechet_distance`, an
eigenvalue form that stays real on rank-deficient covariances; KID is torch-fidelity's. IS and
precision/recall follow ADM's evaluator for an ADM reference batch or `protocol="adm"` (`fid.adm`: in-order IS
splits, its float16 k-NN manifolds) and torch-fidelity's otherwise; precision/recall use k = 3 neighbours and the
extractor of FID (Inception pool features, as in ADM; not torch-fidelity's default VGG-16).

Feature extractors are torch-fidelity registry names. `inception-v3-compat` (default) downloads its
weights into the torch hub cache on first use, or loads `inception_weights=PATH`; offline
(`HF_HUB_OFFLINE=1` or `DIFFIT_OFFLINE=1`) without weights it fails at once with a message saying
where the file goes. :func:`register_test_extractor` registers `diffit-randconv-v1`, a small fixed
random conv net that runs anywhere with no files; its numbers are **not** comparable with Inception
FID and every result computed with it says so.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric
from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric
from torch_fidelity.metric_prc import KEY_METRIC_PRECISION, KEY_METRIC_RECALL, prc_features_to_metric

from diffit_cli.errors import DiffitError
from diffit_cli.events import Progress
from diffit_cli.fid import adm
from diffit_cli.fid.dinov2 import DINOV2
from diffit_cli.fid.extractors import (
    INCEPTION,
    SPATIAL,
    TEST_EXTRACTOR,
    canonical_extractor,
    extract_features,
    extractor_class,
    has_spatial,
    make_extractor,
    resolve_device,
)
from diffit_cli.fid.frechet import check_feature_size, feature_statistics, fid_distance
from diffit_cli.fid.inputs import Images, Statistics, open_input
from diffit_cli.fileio import atomic_write

METRICS = ("fid", "sfid", "is", "kid", "pr")
_ALIASES = {"fid": "fid", "sfid": "sfid", "is": "is", "isc": "is", "kid": "kid", "pr": "pr", "prc": "pr"}
_ALIASES.update(precision="pr", recall="pr")
_LABEL = {"fid": "FID", "sfid": "sFID", "is": "IS", "kid": "KID", "pr": "precision/recall"}
FID_PROTOCOL_SAMPLES = 50_000
SEED = 2020  # torch-fidelity's default rng_seed: IS split shuffle, KID subsets


# ----------------------------------------------------------------------------------------------
# Public entry points


VALUE_KEYS = ("fid", "sfid", "is_mean", "is_std", "kid_mean", "kid_std", "precision", "recall")  # in a result


def with_fid(metrics: Iterable[str] | str) -> tuple[str, ...]:
    """The metric names `metrics` asks for (checked), FID first and always among them: what a checkpoint's
    evaluation computes (its repeats and best snapshot are chosen by FID)."""
    wanted = _parse_metrics(metrics)
    return tuple(["fid"] + [m for m in wanted if m != "fid"])


def _parse_metrics(metrics) -> list[str]:
    if isinstance(metrics, str):
        metrics = metrics.split(",")
    wanted = []
    for m in metrics:
        key = _ALIASES.get(str(m).strip().lower())
        if key is None:
            raise DiffitError(f"--metrics {str(m).strip()!r}: unknown metric; choose from {', '.join(METRICS)}")
        if key not in wanted:
            wanted.append(key)
    if not wanted:
        raise DiffitError(f"no metric asked for; choose from {', '.join(METRICS)}")
    return [m for m in METRICS if m in wanted]


def _describe(source) -> str:
    if isinstance(source, np.ndarray) or torch.is_tensor(source):
        return f"array {tuple(source.shape)}"
    return str(source)


def _extractor_setup(feature_extractor: str | None, device, batch: int) -> tuple[str, type, torch.device]:
    """The extractor's name and class (Inception by default) and the device, after checking the batch size."""
    if int(batch) < 1:
        raise DiffitError(f"batch must be at least 1 (got {batch})")
    cls = extractor_class(feature_extractor or INCEPTION)
    return canonical_extractor(feature_extractor or INCEPTION), cls, resolve_device(device)


def compute_metrics(
    samples,
    reference=None,
    *,
    metrics: Iterable[str] | str = ("fid",),
    batch: int = 64,
    device=None,
    inception_weights=None,
    feature_extractor: str | None = None,
    progress: Progress | None = None,
    protocol: str | None = "auto",
) -> dict:
    """Compute FID (default), IS, KID and precision/recall of `samples` against `reference`.

    samples: an image folder, a `.zip` of images, an `.npz` with `arr_0` (uint8 N×H×W×3, the ADM
    evaluator's layout) or a uint8 NHWC array. reference: the same kinds, or a statistics `.npz`
    (`mu`, `sigma`: EDM's `cifar10-32x32.npz`, ADM's `VIRTUAL_imagenet256_labeled.npz`, or a file
    from :func:`save_reference`). IS needs no reference. metrics: names from `fid, sfid, is, kid, pr`
    (aliases: isc, prc); sFID needs spatial statistics in a statistics file (`mu_s`, `sigma_s`).
    feature_extractor: a torch-fidelity registry name; default
    `inception-v3-compat` (TF Inception pool_3, the features behind the ADM and EDM references).
    inception_weights: a local weights file for offline machines. `progress` receives `diffit_cli.events` as
    images are processed (tasks `features (samples)` and `features (reference)`). protocol: IS and precision/recall
    by ADM's evaluator's conventions (`adm`, `fid.adm`), torch-fidelity's, or `auto`: ADM's for an ADM batch.

    Returns a flat dict: the metric values (`fid`, `sfid`, `is_mean`, `is_std`, `kid_mean`, `kid_std`,
    `precision`, `recall`), then `extractor`, `feature_layers`, `num_samples`, `num_reference`,
    `reference_kind` (images | stats), `samples`, `reference`, `device`, `notes`, `protocol`, `published`.
    Raises DiffitError for anything the user can fix.
    """
    wanted = _parse_metrics(metrics)
    name, cls, dev = _extractor_setup(feature_extractor, device, batch)
    sample_images = open_input(samples, "samples", allow_stats=False)
    ref = _open_reference(reference, wanted, name)
    named, used = _protocol(reference, ref, protocol)
    fidelity_name = {"fid": "fid", "is": "isc", "kid": "kid", "pr": "prc"}
    layers = {m: SPATIAL if m == "sfid" else cls.get_default_feature_layer_for_metric(fidelity_name[m]) for m in wanted}
    fe = make_extractor(name, sorted(set(layers.values())), dev, inception_weights)
    feats = extract_features(sample_images, fe, dev, int(batch), progress, "samples")
    ref_feats = _reference_features(
        ref, wanted, layers, lambda images: extract_features(images, fe, dev, int(batch), progress, "reference")
    )
    result, notes = _metric_values(
        wanted, {m: feats[layers[m]] for m in wanted}, ref, ref_feats, layers, name, protocol=used, device=dev
    )
    n = sample_images.count
    notes += _protocol_notes(name, wanted, n)
    result.update(
        extractor=name,
        feature_layers=layers,
        num_samples=n,
        num_reference=None if ref is None else (ref.count if isinstance(ref, Images) else ref.num_images),
        reference_kind=None if ref is None else ("stats" if isinstance(ref, Statistics) else "images"),
        samples=_describe(samples),
        reference=None if reference is None else _describe(reference),
        device=str(dev),
        notes=notes,
    )
    _add_protocol(result, named, used)
    return result


def _protocol(reference, ref, protocol: str | None):
    """The reference that names the protocol and the release's table (opened even for IS alone, which needs no
    reference), and the protocol IS and precision/recall follow."""
    named = ref
    if named is None and reference is not None:
        named = open_input(reference, "reference", allow_stats=True)
    return named, adm.choose_protocol(protocol, named)


def _add_protocol(result: dict, ref, protocol: str) -> None:
    """`protocol` (`adm` or `torch-fidelity`), and for ADM's ImageNet-256/512 batch `published`: the release's values
    beside the measured ones (`adm.published_beside`), differences only where comparable (Inception features,
    FID-50K, ADM's protocol)."""
    result["protocol"] = protocol
    table = adm.release_table(ref)
    if table is not None:
        comparable = result["extractor"] == INCEPTION and result["num_samples"] == FID_PROTOCOL_SAMPLES
        comparable = comparable and protocol == adm.ADM
        result["published"] = adm.published_beside(result, table, comparable)


def check_reference(reference, metrics: Iterable[str] | str, feature_extractor: str | None = None) -> None:
    """Fail now, before samples are drawn, when `reference` cannot serve `metrics` (e.g. sFID against a statistics
    file without `mu_s`/`sigma_s`); reads no image."""
    _open_reference(reference, _parse_metrics(metrics), feature_extractor or INCEPTION)


def _open_reference(reference, wanted: list[str], extractor: str) -> Images | Statistics | None:
    """The reference that the paired metrics (all but IS) need, opened; a statistics file must come from
    `extractor` (when it names one) and hold features or images for KID and precision/recall."""
    paired = [m for m in wanted if m != "is"]
    if not paired:
        return None
    if reference is None:
        raise DiffitError(
            f"{' and '.join(_LABEL[m] for m in paired)} compare samples with a reference: "
            "pass --ref (images or a statistics file), or --preset NAME for its training set's statistics"
        )
    ref = open_input(reference, "reference", allow_stats=True)
    if isinstance(ref, Statistics):
        if ref.extractor is not None and ref.extractor != extractor:
            raise DiffitError(
                f"{ref.path} was computed with feature extractor {ref.extractor}, but this run uses {extractor}; "
                f"distances across extractors mean nothing "
                f"(use --feature-extractor {ref.extractor} or recompute the reference)"
            )
        if "sfid" in wanted and ref.mu_s is None:
            raise DiffitError(
                f"sFID needs the reference's spatial statistics (`mu_s`, `sigma_s`), but {ref.path} holds none "
                "(ADM's reference batches and statistics saved with --save-ref carry them); pass the reference "
                "images, or save their statistics again with `diffit eval-fid DATASET --save-ref FILE`"
            )
        need_ref_features = [m for m in paired if m not in ("fid", "sfid")]
        if need_ref_features and ref.features is None and ref.images is None:
            what = " and ".join(_LABEL[m] for m in need_ref_features)
            raise DiffitError(
                f"{what} need reference images or features, but {ref.path} holds only "
                "mu/sigma; pass the dataset (folder, zip or npz) as the reference, or save statistics with features"
            )
    return ref


def _reference_features(ref, wanted: list[str], layers: dict, extract) -> dict | None:
    """The reference's features by layer: extracted from its images, or the ones a statistics file stores (for KID
    and precision/recall, which need per-image features; FID reads a statistics file's mu/sigma instead)."""
    if isinstance(ref, Images):
        return extract(ref)
    if not isinstance(ref, Statistics) or not any(m in ("kid", "pr") for m in wanted):
        return None
    if ref.features is None:
        return extract(ref.images)
    for m in ("kid", "pr"):
        if m in wanted and ref.feature_layer not in (None, layers[m]):
            raise DiffitError(
                f"{ref.path} stores {ref.feature_layer} features but {_LABEL[m]} uses {layers[m]} "
                "with this extractor; pass the dataset as the reference"
            )
    return {layers[m]: torch.from_numpy(ref.features) for m in wanted if m in ("kid", "pr")}


def _metric_values(
    wanted: list[str],
    feats: dict,
    ref,
    ref_feats: dict | None,
    layers: dict,
    extractor: str,
    *,
    protocol: str = adm.TORCH_FIDELITY,
    device=None,
):
    """Each wanted metric from the samples' features (`feats`, by metric) and the reference's (by layer): the values
    and the notes that qualify them. IS and precision/recall follow `protocol` (`adm` or `torch-fidelity`)."""
    result: dict = {}
    notes: list[str] = []
    if "fid" in wanted:
        ref_fid = None if ref_feats is None else ref_feats[layers["fid"]]
        result["fid"] = _fid(feats["fid"], ref, ref_fid, extractor, notes)
        if extractor == DINOV2:  # the Fréchet distance of DINOv2 features is EDM2's FD-DINOv2
            result["fd_dinov2"] = result["fid"]
    if "sfid" in wanted:
        result["sfid"] = _sfid(feats["sfid"], ref, None if ref_feats is None else ref_feats[SPATIAL])
    if "is" in wanted and protocol == adm.ADM:
        result["is_mean"], result["is_std"] = adm.inception_score(feats["is"])
    elif "is" in wanted:
        splits = max(1, min(10, len(feats["is"])))
        r = isc_features_to_metric(feats["is"], splits=splits, shuffle=True, rng_seed=SEED)
        result["is_mean"], result["is_std"] = r[KEY_METRIC_ISC_MEAN], r[KEY_METRIC_ISC_STD]
    if "kid" in wanted:
        result.update(_kid(feats["kid"], ref_feats[layers["kid"]], notes))
    if "pr" in wanted and protocol == adm.ADM:
        check_feature_size(feats["pr"].shape[1], ref_feats[layers["pr"]].shape[1], "precision/recall")
        dev = device or "cpu"
        result.update(adm.precision_recall(feats["pr"].to(dev), ref_feats[layers["pr"]].to(dev)))
    elif "pr" in wanted:
        result.update(_precision_recall(feats["pr"], ref_feats[layers["pr"]]))
    return result, notes


def _fid(features: torch.Tensor, ref, ref_features: torch.Tensor | None, extractor: str, notes: list[str]) -> float:
    """FID of the samples' features against a statistics file's mu/sigma or the reference images' features."""
    if len(features) < 2:
        raise DiffitError("FID needs at least 2 samples")
    if isinstance(ref, Statistics):
        if ref.extractor is None and extractor != INCEPTION:
            notes.append(f"{ref.path} does not name its extractor; assumed it matches {extractor}")
        return fid_distance(feature_statistics(features), {"mu": ref.mu, "sigma": ref.sigma}, str(ref.path))
    return fid_distance(feature_statistics(features), feature_statistics(ref_features))


def _sfid(features: torch.Tensor, ref, ref_features: torch.Tensor | None) -> float:
    """sFID (Nash et al. 2021, as ADM's evaluator computes it): the Fréchet distance between the spatial features'
    statistics of the samples and a statistics file's `mu_s`/`sigma_s` or the reference images' features."""
    if len(features) < 2:
        raise DiffitError("sFID needs at least 2 samples")
    if isinstance(ref, Statistics):
        return fid_distance(feature_statistics(features), {"mu": ref.mu_s, "sigma": ref.sigma_s}, str(ref.path), "sFID")
    return fid_distance(feature_statistics(features), feature_statistics(ref_features), what="sFID")


def _kid(f1: torch.Tensor, f2: torch.Tensor, notes: list[str]) -> dict:
    check_feature_size(f1.shape[1], f2.shape[1], "KID")
    subset = min(1000, len(f1), len(f2))
    if subset < 2:
        raise DiffitError("KID needs at least 2 samples and 2 reference images")
    r = kid_features_to_metric(f1, f2, kid_subsets=100, kid_subset_size=subset, rng_seed=SEED, verbose=False)
    if subset < 1000:
        notes.append(f"KID used subsets of {subset} (fewer than the usual 1000 images)")
    return {"kid_mean": r[KEY_METRIC_KID_MEAN], "kid_std": r[KEY_METRIC_KID_STD]}


def _precision_recall(f1: torch.Tensor, f2: torch.Tensor) -> dict:
    check_feature_size(f1.shape[1], f2.shape[1], "precision/recall")
    if min(len(f1), len(f2)) < 4:
        raise DiffitError("precision/recall need at least 4 samples and 4 reference images (k = 3 neighbours)")
    r = prc_features_to_metric(f1, f2, prc_neighborhood=3, prc_batch_size=10000, save_cpu_ram=True, verbose=False)
    return {"precision": r[KEY_METRIC_PRECISION], "recall": r[KEY_METRIC_RECALL]}


def _protocol_notes(extractor: str, wanted: list[str], n: int) -> list[str]:
    """What makes these numbers differ from published ones: the stand-in extractor, fewer than 50k samples."""
    notes = []
    if extractor == TEST_EXTRACTOR:
        notes.append(
            f"features from {TEST_EXTRACTOR} (fixed random conv net), not Inception: "
            "not comparable with published numbers"
        )
    if "fid" in wanted and n != FID_PROTOCOL_SAMPLES:
        notes.append(
            f"{n} samples; published FID (FID-50K) uses {FID_PROTOCOL_SAMPLES:,}, and FID grows as the count shrinks"
        )
    return notes


def save_reference(
    dataset,
    out_file,
    *,
    batch: int = 64,
    device=None,
    inception_weights=None,
    feature_extractor: str | None = None,
    features: bool = False,
    progress: Progress | None = None,
) -> dict:
    """Compute `mu`/`sigma` of a dataset (folder, zip, npz, array or open `Images`) and save them to `out_file`
    (.npz).

    The file also records `extractor`, `feature_layer` and `num_images`, sFID's spatial statistics `mu_s`,
    `sigma_s` (as in ADM's reference batches; every extractor with spatial features), and with `features=True`
    the per-image features (so KID and precision/recall can run against it later). It is written
    atomically and reads back in EDM's and ADM's tools too (they read `mu` and `sigma`).
    Returns a summary dict (path, num_images, extractor, feature_layer, dim).
    """
    out = Path(os.fspath(out_file)).expanduser()
    if out.suffix.lower() != ".npz":
        raise DiffitError(f"reference statistics are saved as .npz; got {out}")
    name, cls, dev = _extractor_setup(feature_extractor, device, batch)
    images = open_input(dataset, "dataset", allow_stats=False)
    if images.count < 2:
        raise DiffitError("reference statistics need at least 2 images")
    layer = cls.get_default_feature_layer_for_metric("fid")
    spatial = has_spatial(name)
    fe = make_extractor(name, [layer, SPATIAL] if spatial else [layer], dev, inception_weights)
    extracted = extract_features(images, fe, dev, int(batch), progress, "reference")
    feats = extracted[layer]
    stats = feature_statistics(feats)
    arrays = dict(
        mu=stats["mu"],
        sigma=stats["sigma"],
        extractor=np.array(name),
        feature_layer=np.array(layer),
        num_images=np.array(images.count, dtype=np.int64),
    )
    if spatial:  # sFID's statistics, under the names ADM's reference batches use
        spatial_stats = feature_statistics(extracted[SPATIAL])
        arrays.update(mu_s=spatial_stats["mu"], sigma_s=spatial_stats["sigma"], spatial_layer=np.array(SPATIAL))
    if features:
        arrays["features"] = feats.numpy().astype(np.float32)
    atomic_write(out, lambda f: np.savez(f, **arrays))
    dim = int(stats["mu"].shape[0])
    return {"path": str(out), "num_images": images.count, "extractor": name, "feature_layer": layer, "dim": dim}
