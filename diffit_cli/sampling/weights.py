"""Weights by reference (a file, an exported folder, a Hub reference) and their short hash, and the guiding network of
autoguidance (Karras et al. 2024, "Guiding a Diffusion Model with a Bad Version of Itself"), read and checked
against the network it guides before either is built."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from diffit_cli.checkpoint import NoPresetError, file_sha256, read_snapshot, snapshot_network
from diffit_cli.config import Preset
from diffit_cli.errors import DiffitError
from diffit_cli.sharing.folder import MODEL_FILE
from diffit_cli.sharing.hub import download_model, is_repo_id

GUIDE_SETTING = "sample.guidance.guide / --guide-ckpt"
# EDM's σ distribution of the training loss: it shapes how a network was trained, not the denoiser it is
TRAINING_ONLY = frozenset({"p_mean", "p_std"})


class GuideError(DiffitError):
    """The guiding network of autoguidance cannot guide this model (missing, not a checkpoint, another shape)."""


def resolve_weights(ref: str) -> Path:
    """A local file or exported model folder (`diffit export`), a Hub reference `REPO:FILE` (e.g.
    nvidia/DiffiT:diffit_256.safetensors) or a Hub repository `OWNER/NAME` holding an exported folder, both through
    the Hub's cache. A local path of that name always wins over the Hub."""
    path = Path(ref)
    if path.exists():
        if not path.is_file() and not path.is_dir():
            raise DiffitError(f"checkpoint {ref!r} is neither a file nor a folder")
        return path
    if is_repo_id(ref):
        return download_model(ref)
    if ":" not in ref:
        raise DiffitError(
            f"checkpoint {ref!r} does not exist (give a .pt/.safetensors file, an exported model folder, "
            "REPO:FILE or a Hub repository OWNER/NAME)"
        )
    repo, _, filename = ref.partition(":")
    from huggingface_hub import hf_hub_download  # here: only Hub references need it

    try:
        return Path(hf_hub_download(repo_id=repo, filename=filename))
    except Exception as e:  # offline, missing repo/file, no network: one message with the fix
        raise DiffitError(
            f"could not fetch {filename!r} from the Hub repository {repo!r} ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}); when offline, download it elsewhere "
            f"(huggingface-cli download {repo} {filename}) and pass the local file"
        ) from None


def weights_sha256(path: Path) -> str:
    """The short SHA-256 that identifies the weights a recipe used: the file's, or an exported folder's weights."""
    return file_sha256(path / MODEL_FILE if path.is_dir() else path, 16)


@dataclass
class GuideSnapshot:
    """A guiding network read and checked but not built yet: its reference, weights (EMA), preset and hash."""

    spec: str
    path: Path
    weights: dict | None
    preset: Preset
    sha256: str

    def network(self, device: torch.device | str = "cpu") -> torch.nn.Module:
        """The guide's network in eval mode on `device` (the weights are released once it is built)."""
        net = snapshot_network(self.weights, self.preset, self.spec, device)
        self.weights = None
        return net


def read_guide(spec: str, main: Preset) -> GuideSnapshot:
    """Read the guiding network `spec` (what `--ckpt` accepts) and check it against the `main` preset; a missing
    file, something that is not a diffit checkpoint, or a guide of another shape is one line (`GuideError`)."""
    try:
        path = resolve_weights(spec)
        weights, preset = read_snapshot(path)
    except NoPresetError:
        raise GuideError(
            f"guiding network {spec!r} ({GUIDE_SETTING}) carries no preset: give a diffit checkpoint, a "
            ".safetensors file written by diffit or an exported folder"
        ) from None
    except DiffitError as e:
        raise GuideError(f"guiding network ({GUIDE_SETTING}): {e}") from None
    check_guide(preset, main, spec)
    return GuideSnapshot(spec=spec, path=path, weights=weights, preset=preset, sha256=weights_sha256(path))


def preset_guide(preset: Preset) -> GuideSnapshot | None:
    """The guide `preset` autoguides with (`sample.guidance.mode` auto), read and checked; None for CFG. A guide
    named while the guidance stays `cfg` (by --guide-ckpt or --set) would be silently unused, so it is refused."""
    g = preset.sample.guidance
    if g.mode == "auto":
        return read_guide(g.guide, preset)
    if g.guide is not None:
        raise GuideError(
            "--guide-ckpt (sample.guidance.guide) goes with --guidance auto (autoguidance); the guidance here is "
            "cfg (classifier-free)"
        )
    return None


def guide_mismatches(guide: Preset, main: Preset) -> list[str]:
    """What differs between a guide's preset and the main one's among what autoguidance needs equal: the input and
    output (space, size, channels, learned variance), the classes, and the diffusion, whose preconditioning must be
    shared for the raw outputs to combine as the denoisers do (D_guide + w·(D − D_guide)). Each as 'what GUIDE
    (guide) vs MAIN (main)'."""
    g, m = guide.model, main.model
    pairs = [
        ("data.space", guide.data.space, main.data.space),
        ("resolution (model grid)", g.spatial_size, m.spatial_size),
        ("model.in_channels", g.in_channels, m.in_channels),
        ("learned variance", getattr(g, "learn_sigma", False), getattr(m, "learn_sigma", False)),
        ("model.num_classes", g.num_classes, m.num_classes),
        ("diffusion.kind", guide.diffusion.kind, main.diffusion.kind),
    ]
    if main.data.space == "latent":
        pairs.append(("data.latent_scale", guide.data.latent_scale, main.data.latent_scale))
    if guide.diffusion.kind == main.diffusion.kind:
        gd, md = guide.diffusion.model_dump(), main.diffusion.model_dump()
        pairs += [(f"diffusion.{k}", gd[k], md[k]) for k in md if k not in TRAINING_ONLY and k != "kind"]
    return [f"{what} {a} (guide) vs {b} (main)" for what, a, b in pairs if a != b]


def check_guide(guide: Preset, main: Preset, spec: str) -> None:
    """Refuse a guide that differs from the main model in what `guide_mismatches` lists, naming every difference."""
    bad = guide_mismatches(guide, main)
    if bad:
        raise GuideError(
            f"guiding network {spec!r} does not fit the model it guides: {'; '.join(bad)} (autoguidance needs a "
            "guide of the same data, resolution, channels, classes and diffusion)"
        )


def load_guide(spec: str, main: Preset, device: torch.device | str = "cpu") -> tuple[torch.nn.Module, str]:
    """(the guiding network in eval mode on `device`, the short SHA-256 of its weights) for autoguidance."""
    snap = read_guide(spec, main)
    return snap.network(device), snap.sha256
