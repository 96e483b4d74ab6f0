"""Feature extractors for the metrics: torch-fidelity's registry (Inception-v3 `inception-v3-compat`, weights
downloaded or given as a file, a clear message offline) and `diffit-randconv-v1`, a fixed random conv net that
runs anywhere with no files (its numbers are not comparable with Inception FID; results say so)."""

from __future__ import annotations

import contextlib
import math
import os
import socket
import urllib.error
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlparse

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor
from torch_fidelity.utils import create_feature_extractor

from diffit_cli.downloads import offline
from diffit_cli.errors import DiffitError
from diffit_cli.events import Progress, Start, Step, quiet
from diffit_cli.fid.dinov2 import DINOV2, DINOV2_ALIASES, DINOV2_URL, DinoV2FeatureExtractor, dinov2_weights_cache_path
from diffit_cli.fid.inputs import Images, rgb
from diffit_cli.fid.local_extractor import LocalFeatureExtractor

INCEPTION = "inception-v3-compat"
TEST_EXTRACTOR = "diffit-randconv-v1"
DOWNLOAD_TIMEOUT_S = 30
SPATIAL = "spatial"  # the feature name of sFID's spatial features, for every extractor that has them
SPATIAL_CHANNELS = 7  # Nash et al. 2021 / ADM's evaluator: the first 7 channels of a 17×17 layer
# Inception's spatial layer: TF's `mixed_6/conv` (see `spatial_features`)
INCEPTION_SPATIAL_MODULE = "Mixed_6d.branch1x1"


def spatial_features(fmap: torch.Tensor) -> torch.Tensor:
    """sFID's features of a (N, C, H, W) map: its first 7 channels, flattened in TF's NHWC order.

    ADM's evaluator (Dhariwal & Nichol 2021, after Nash et al. 2021) takes the tensor `mixed_6/conv:0` of the
    TF Inception-v3 graph of 2015-12-05, keeps `[..., :7]` and reshapes each image to one row: 17·17·7 = 2023
    values, ordered row, column, channel. The same order here makes our mean and covariance comparable entry by
    entry with the `mu_s`/`sigma_s` that ADM's reference batches store.
    """
    x = fmap[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1)
    return x.reshape(len(x), -1).float()


class SpatialTap:
    """Records sFID's spatial features of the layer `module` while the extractor computes its pool features.

    Inception's `mixed_6/conv` in TF's graph is torch-fidelity's `Mixed_6d.branch1x1` in `inception-v3-compat`
    (`FeatureExtractorInceptionV3`, a port of the same 2015-12-05 graph): the TF graph names its seventh mixed
    block `mixed_6` (`mixed`, `mixed_1`, `mixed_2` are Mixed_5b–5d at 35×35; `mixed_3` is the reduction Mixed_6a
    to 17×17; `mixed_4`…`mixed_7` are Mixed_6b–6e, 17×17×768 each), and in each block `conv` is the 1×1 branch
    (the towers are `tower`, `tower_1`, `tower_2`). torch-fidelity's weight converter maps
    `mixed_6/conv/conv2d_params` and `mixed_6/conv/batchnorm` to `Mixed_6d.branch1x1.conv` and `.bn`, and the TF
    node `mixed_6/conv` is that unit's ReLU output, which is what `BasicConv2d.forward` returns: 17×17×192, of
    which ADM keeps the first 7 channels (2023 values). A forward hook reads it during the one forward pass
    that also produces `pool_3` (Mixed_6d runs before Mixed_7a–7c and the pool), so no image is seen twice.
    """

    def __init__(self, module: nn.Module):
        self.captured: torch.Tensor | None = None
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output):
        self.captured = spatial_features(output.detach())

    def take(self) -> torch.Tensor:
        out, self.captured = self.captured, None
        if out is None:
            raise RuntimeError("the spatial layer did not run in this forward pass")
        return out


class RandConvFeatureExtractor(LocalFeatureExtractor):
    """A fixed random 3-stage conv net (seeded, so identical on every machine): offline stand-in for Inception.

    Images are resized to 64² (antialiased bilinear), mapped to [-1, 1] and passed through three
    stride-2 3×3 convolutions (32, 32, 64 channels, He-scaled Gaussian weights from a fixed seed,
    leaky ReLU). `features` is the spatial mean of every stage (128 values: colour, edges, texture
    at three scales); `spatial` is the last stage's first 7 channels, 8×8×7 = 448 values (sFID's
    counterpart of Inception's `mixed_6/conv`); `logits` is a fixed random projection of the per-image
    standardised features onto 10 pseudo-classes, so IS is defined (between 1 and 10). Meant for tests and smoke runs
    where no Inception weights exist; FID computed with it is not comparable with published FID.
    """

    SEED = 20231204
    SIZE = 64
    WIDTHS = (32, 32, 64)
    NUM_LOGITS = 10

    def __init__(self, name, features_list, **kwargs):
        super().__init__(name, features_list)
        g = torch.Generator().manual_seed(self.SEED)
        convs, cin = [], 3
        for width in self.WIDTHS:
            conv = nn.Conv2d(cin, width, 3, stride=2, padding=1)
            with torch.no_grad():
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * math.sqrt(2.0 / (cin * 9)))
                conv.bias.copy_(torch.randn(width, generator=g) * 0.1)
            convs.append(conv)
            cin = width
        self.convs = nn.ModuleList(convs)
        dim = sum(self.WIDTHS)
        self.register_buffer("proj", torch.randn(dim, self.NUM_LOGITS, generator=g) * (3.0 / math.sqrt(dim)))
        self.requires_grad_(False)
        self.eval()

    @staticmethod
    def get_provided_features_list():
        return "features", "logits", SPATIAL

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return {"isc": "logits", "fid": "features", "kid": "features", "prc": "features", "sfid": SPATIAL}[metric]

    def forward(self, x):
        self.check_input(x)
        x = x.float() / 127.5 - 1.0
        if tuple(x.shape[-2:]) != (self.SIZE, self.SIZE):
            x = F.interpolate(x, size=(self.SIZE, self.SIZE), mode="bilinear", align_corners=False, antialias=True)
        pooled = []
        for conv in self.convs:
            x = F.leaky_relu(conv(x), 0.2)
            pooled.append(x.mean(dim=(2, 3)))
        feats = torch.cat(pooled, dim=1)
        z = (feats - feats.mean(1, keepdim=True)) / (feats.std(1, keepdim=True) + 1e-6)
        out = {"features": feats, "logits": z @ self.proj, SPATIAL: spatial_features(x)}
        return tuple(out[name] for name in self.features_list)


def register_test_extractor() -> str:
    """Register `diffit-randconv-v1` with torch-fidelity (idempotent) and return its name."""
    if TEST_EXTRACTOR not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(TEST_EXTRACTOR, RandConvFeatureExtractor)
    return TEST_EXTRACTOR


def register_dinov2() -> str:
    """Put `DinoV2FeatureExtractor` (EDM2's preprocessing, no torch.hub code download) under torch-fidelity's name
    `dinov2-vit-l-14` and its alias `dinov2-vit-l14` (idempotent); return the name."""
    for name in (DINOV2, *DINOV2_ALIASES):
        FEATURE_EXTRACTORS_REGISTRY[name] = DinoV2FeatureExtractor
    return DINOV2


def canonical_extractor(name: str) -> str:
    """The name results and statistics files record: an alias of DINOv2 ViT-L/14 becomes torch-fidelity's name."""
    return DINOV2 if name in DINOV2_ALIASES else name


def _where_to_put_dinov2() -> str:
    return (
        f"Download {DINOV2_URL} on a machine with network, then pass --dinov2-weights PATH "
        f"(Python: inception_weights=PATH) or copy it to {dinov2_weights_cache_path()} "
        "(the torch hub cache; set TORCH_HOME to move it)."
    )


def inception_weights_cache_path() -> Path:
    """Where torch-fidelity keeps (and looks for) the Inception weights: <torch hub dir>/checkpoints/<file>."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(URL_INCEPTION_V3).path)


def _where_to_put_weights() -> str:
    return (
        f"Download {URL_INCEPTION_V3} on a machine with network, then pass --inception-weights PATH "
        f"(Python: inception_weights=PATH) or copy it to {inception_weights_cache_path()} "
        "(the torch hub cache; set TORCH_HOME to move it)."
    )


@contextlib.contextmanager
def _socket_timeout(seconds: float):
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(old)


def resolve_device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise DiffitError(f"--device {device!r}: unknown device; choose cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DiffitError("--device cuda was asked for but no CUDA GPU is available; use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise DiffitError(f"unsupported device {device!r}; use cpu or cuda")
    return dev


def extractor_class(name: str, named_as: str = "--feature-extractor"):
    """torch-fidelity's class of extractor `name`; an unknown name is one line naming where it was given
    (`named_as`: the flag, or `eval.feature_extractor =` for a preset), the name and the choices."""
    register_test_extractor()  # one of the choices
    register_dinov2()
    if name not in FEATURE_EXTRACTORS_REGISTRY:
        known = ", ".join(sorted(FEATURE_EXTRACTORS_REGISTRY))
        raise DiffitError(f"{named_as} {name!r}: unknown feature extractor; choose {known}")
    return FEATURE_EXTRACTORS_REGISTRY[name]


def check_weights_at_hand(name: str | None, weights) -> Path | None:
    """Whether extractor `name` can get its weights, without reading them: a file given must exist; Inception with
    none given and none cached needs downloads on. The file given, as a path, or None."""
    if weights is not None:
        path = Path(os.fspath(weights)).expanduser()
        if not path.is_file():
            raise DiffitError(f"feature-extractor weights file not found: {path} is not a file")
        return path
    if name == INCEPTION and not inception_weights_cache_path().is_file() and offline():
        raise DiffitError(
            "FID needs the Inception-v3 weights (torch-fidelity's inception-v3-compat, 91 MB), which are not on this "
            "machine, and downloads are off (HF_HUB_OFFLINE/DIFFIT_OFFLINE). "
            + _where_to_put_weights()
            + f" To try the pipeline only, the offline stand-in {TEST_EXTRACTOR} (--feature-extractor, or "
            "eval.feature_extractor in a preset) needs no weights; its numbers are not comparable to published FIDs."
        )
    if canonical_extractor(name or "") == DINOV2 and not dinov2_weights_cache_path().is_file() and offline():
        raise DiffitError(
            "FD-DINOv2 needs the DINOv2 ViT-L/14 weights (dinov2_vitl14_pretrain.pth, 1.2 GB), which are not on this "
            "machine, and downloads are off (HF_HUB_OFFLINE/DIFFIT_OFFLINE). " + _where_to_put_dinov2()
        )
    return None


def check_extractor(name: str, inception_weights=None, load: bool = True) -> None:
    """Fail now, before any sampling or training, when extractor `name` is unknown or its weights are missing
    (`check_weights_at_hand`). With `load`, Inception is also built on the CPU, which reads (or downloads) its
    weights, so a file that does not hold them fails here too; the stand-in needs no weights."""
    layer = extractor_class(name).get_default_feature_layer_for_metric("fid")
    if load and name != TEST_EXTRACTOR:
        make_extractor(name, [layer], torch.device("cpu"), inception_weights)
    else:
        check_weights_at_hand(name, inception_weights)


def has_spatial(name: str) -> bool:
    """Whether extractor `name` gives sFID's spatial features (Inception through `SpatialTap`, the stand-in
    natively)."""
    return name == INCEPTION or SPATIAL in extractor_class(name).get_provided_features_list()


def make_extractor(name: str, layers: Sequence[str], device: torch.device, weights) -> FeatureExtractorBase:
    """Extractor `name` giving `layers`; `SPATIAL` among them on Inception attaches a `SpatialTap`, so
    `extract_features` returns the spatial features from the same forward pass as the others."""
    layers = list(layers)
    tapped = name == INCEPTION and SPATIAL in layers
    if SPATIAL in layers and not has_spatial(name):
        raise DiffitError(
            f"sFID needs spatial features (Inception's mixed_6/conv), which feature extractor {name} does not give; "
            f"use --feature-extractor {INCEPTION}"
        )
    if tapped:
        layers.remove(SPATIAL)
        if not layers:  # the forward must reach Mixed_6d: ask for the pool features, which lie beyond it
            layers.append(extractor_class(name).get_default_feature_layer_for_metric("fid"))
    fe = _create_extractor(name, layers, weights)
    if tapped:
        fe._diffit_spatial_tap = SpatialTap(fe.get_submodule(INCEPTION_SPATIAL_MODULE))
    return fe.to(device)


def _create_extractor(name: str, layers: list[str], weights) -> FeatureExtractorBase:
    kwargs = {}
    path = check_weights_at_hand(name, weights)
    if path is not None:
        try:  # refuse arbitrary pickles before torch-fidelity loads the file
            torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # (torch's own message suggests unsafe loading: never repeat it)
            url = DINOV2_URL if canonical_extractor(name) == DINOV2 else URL_INCEPTION_V3
            raise DiffitError(
                f"{path} is not a file of {name} weights: expected a PyTorch state dict of tensors such as "
                f"{os.path.basename(urlparse(url).path)} ({url}); it cannot be read as "
                "tensors, and diffit never loads files that need code execution"
            ) from None
        kwargs["feature_extractor_weights_path"] = str(path)
    downloading = weights is None and name == INCEPTION and not inception_weights_cache_path().is_file()
    try:
        with _socket_timeout(DOWNLOAD_TIMEOUT_S):
            fe = create_feature_extractor(name, list(layers), cuda=False, verbose=downloading, **kwargs)
    except (urllib.error.URLError, TimeoutError, ConnectionError, socket.gaierror) as e:
        where = _where_to_put_dinov2() if canonical_extractor(name) == DINOV2 else _where_to_put_weights()
        raise DiffitError(f"could not download the weights of feature extractor {name} ({e}). " + where) from None
    except Exception as e:  # a file that is not (complete) weights of this extractor
        first_line = (str(e).splitlines() or [type(e).__name__])[0]
        if weights is not None:
            raise DiffitError(f"{weights} does not hold {name} weights: {first_line}") from None
        if name == INCEPTION and inception_weights_cache_path().is_file():
            raise DiffitError(
                f"the cached Inception weights {inception_weights_cache_path()} are unreadable ({first_line}); "
                "delete the file to download it again, or pass --inception-weights PATH"
            ) from None
        raise
    return fe


@contextlib.contextmanager
def exact_convolutions():
    """TF32 off while extracting features, so numbers match the fp32 reference implementations."""
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


def extract_features(
    images: Images, fe: FeatureExtractorBase, device, batch: int, progress: Progress | None, stage: str
) -> dict:
    """Features of every image, by layer (`SPATIAL` too when `make_extractor` was asked for it); `progress` sees a
    `features (<stage>)` task."""
    out: dict[str, list[torch.Tensor]] = {}
    tap = getattr(fe, "_diffit_spatial_tap", None)
    done = 0
    emit, task = progress or quiet, f"features ({stage})"
    emit(Start(task, images.count, 0, "images"))
    with torch.no_grad(), exact_convolutions():
        for arr in images.batches(batch):
            x = torch.from_numpy(rgb(arr)).permute(0, 3, 1, 2).contiguous().to(device)
            feats = fe.convert_features_tuple_to_dict(fe(x))
            if tap is not None:
                feats[SPATIAL] = tap.take()
            for k, v in feats.items():
                out.setdefault(k, []).append(v.detach().float().cpu())
            done += len(arr)
            emit(Step(task, done, images.count))
    return {k: torch.cat(v) for k, v in out.items()}
