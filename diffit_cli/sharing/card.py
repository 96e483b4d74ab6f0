"""The model card: `README.md` with the Hub's YAML front matter (license, library, tags, dataset, FID results in
`model-index`) and a body saying what the network is, what it was trained on and for how long, how its recipe
differs from the shipped preset of its name, how good it measured, and the command that reproduces its grid."""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field

import yaml

from diffit_cli import __version__
from diffit_cli.config import Preset, available_presets, diff_presets, load_preset, preset_to_dict

# Hub dataset ids of the datasets by name a preset can train on (the Hub's cards link them)
HUB_DATASETS = {
    "torchvision:CIFAR10": "uoft-cs/cifar10",
    "torchvision:MNIST": "ylecun/mnist",
    "torchvision:FashionMNIST": "zalando-datasets/fashion_mnist",
}
PAPER_DATASETS = {"imagenet256": "ILSVRC/imagenet-1k", "imagenet512": "ILSVRC/imagenet-1k"}
SAMPLE_SEEDS = "0-15"


@dataclass
class CardFacts:
    """What the card states about one export, gathered from the checkpoint, its run folder and the network."""

    name: str
    preset: Preset
    parameters: int
    weights: str  # "ema" or "raw"
    dtype: str
    source: str  # the checkpoint's file name
    training: dict | None  # kimg, step (None: a weight file without training state)
    data: dict  # source, fingerprint, images
    fid: list[dict] = field(default_factory=list)  # FID points from the run's log.jsonl
    license: str = "apache-2.0"
    ckpt_ref: str = ""  # how the sample command names the model (folder name or OWNER/NAME)


def sample_command(ckpt_ref: str) -> str:
    """The `diffit sample` command that draws samples.png, as the card prints it."""
    return f"diffit sample --ckpt {shlex.quote(ckpt_ref)} --seeds {SAMPLE_SEEDS} --out samples --grid samples.png"


def dataset_id(preset: Preset) -> str | None:
    """The Hub dataset the model trained on, when the preset names one."""
    path = str(preset.data.path or "")
    if path.startswith("hf:"):
        repo = path[3:].split(":")[0]
        return repo if repo.count("/") == 1 and not repo.startswith((".", "/", "~")) else None
    if path.startswith("torchvision:"):
        return HUB_DATASETS.get(":".join(path.split(":")[:2]))
    return None if preset.data.synthetic else PAPER_DATASETS.get(preset.name)


def front_matter(f: CardFacts) -> dict:
    p = f.preset
    tags = ["diffit", "diffusion", "image-generation", "safetensors"]
    tags.append("class-conditional" if p.model.num_classes else "unconditional-image-generation")
    tags.append("latent-diffusion" if p.data.space == "latent" else "pixel-space")
    meta: dict = {"license": f.license, "library_name": "diffit", "tags": tags}
    if not p.model.num_classes:
        meta["pipeline_tag"] = "unconditional-image-generation"
    ds = dataset_id(p)
    if ds:
        meta["datasets"] = [ds]
    if f.fid:
        last = f.fid[-1]
        meta["model-index"] = [
            {
                "name": f.name,
                "results": [
                    {
                        "task": {"type": "image-generation", "name": "Image generation"},
                        "dataset": {"name": f.data["source"], "type": ds or f.data["source"]},
                        "metrics": [
                            {
                                "type": "fid",
                                "value": round(float(last["fid"]), 4),
                                "name": f"FID ({last.get('extractor')}, {last.get('num_samples')} samples, "
                                f"{p.sample.sampler} {p.sample.steps} steps, at {last['kimg']:g} kimg)",
                            }
                        ],
                    }
                ],
            }
        ]
    return meta


def recipe_differences(preset: Preset) -> list[str]:
    """'`key`: shipped → this' lines against the shipped preset of the same name ([] when it is not one)."""
    if preset.name not in available_presets():
        return []
    shipped, own = preset_to_dict(load_preset(preset.name)), preset_to_dict(preset)
    lines = []
    for key in diff_presets(shipped, own):
        a, b = _lookup(shipped, key), _lookup(own, key)
        lines.append(f"- `{key}`: {json.dumps(a)} → {json.dumps(b)}")
    return lines


def _lookup(raw: dict, key: str):
    node = raw
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def render_card(f: CardFacts) -> str:
    """The card's text: front matter, then the body's sections."""
    head = [
        "---",
        yaml.safe_dump(front_matter(f), sort_keys=False, allow_unicode=True).rstrip(),
        "---",
        "",
        f"# {f.name}",
        "",
        f"A DiffiT model (Hatamizadeh et al., *Diffusion Vision Transformers for Image Generation*, arXiv 2312.02139)"
        f" trained with diffit {__version__}, preset `{f.preset.name}`.",
        "",
        f"![samples: seeds {SAMPLE_SEEDS}](samples.png)",
    ]
    sections = (_network(f), _training(f), _recipe(f.preset), _fid(f), _use(f))
    return "\n".join(head + [line for section in sections for line in section])


def _network(f: CardFacts) -> list[str]:
    p, m = f.preset, f.preset.model
    space = f"latent space through the VAE `{p.data.vae}`" if p.data.space == "latent" else "pixel space"
    classes = f"{m.num_classes} classes" if m.num_classes else "unconditional"
    return [
        "",
        "## Network",
        "",
        f"- `{m.kind}` network, {f.parameters:,} parameters, {p.data.resolution}×{p.data.resolution} images in "
        f"{space}, {classes}; diffusion `{p.diffusion.kind}`.",
        f"- `model.safetensors`: the {'EMA' if f.weights == 'ema' else 'trained (not EMA)'} weights in {f.dtype}; "
        "`config.json`: the network's constructor arguments; `preset.yaml`: the full recipe.",
        f"- Sampler: `{p.sample.sampler}`, {p.sample.steps} steps, guidance scale {p.sample.guidance.scale:g}.",
    ]


def _training(f: CardFacts) -> list[str]:
    p = f.preset
    lines = ["", "## Training data", "", f"- Source: {f.data['source']}", f"- Fingerprint: {f.data['fingerprint']}"]
    if f.data.get("images"):
        lines.append(f"- Images: {f.data['images']:,}")
    lines += ["", "## Training", ""]
    if f.training:
        lines.append(
            f"- {f.training['kimg']:g} kimg ({f.training['step']:,} optimizer steps) at batch {p.train.batch}, "
            f"`{p.train.optimizer}` lr {p.train.lr:g}, {_ema(p)}; exported from `{f.source}`."
        )
    else:
        lines.append(f"- Exported from the weight file `{f.source}`, which records no training state.")
    return lines


def _ema(p: Preset) -> str:
    """The EMA as the preset sets it: EDM's half-life in kimg, or ADM/DiT's per-step decay."""
    if p.train.ema_halflife_kimg is not None:
        return f"EMA half-life {p.train.ema_halflife_kimg:g} kimg"
    return f"EMA decay {p.train.ema_decay:g} per step"


def _recipe(p: Preset) -> list[str]:
    lines = ["", f"## Recipe: differences from the shipped preset `{p.name}`", ""]
    if p.name not in available_presets():
        return lines + [f"`{p.name}` is not a preset shipped with diffit; `preset.yaml` holds the whole recipe."]
    return lines + (recipe_differences(p) or ["None: the recipe is the shipped preset's."])


def _fid(f: CardFacts) -> list[str]:
    lines = ["", "## FID", ""]
    if not f.fid:
        return lines + [
            f"No FID was measured along training. To score it: `diffit eval-fid --ckpt {shlex.quote(f.ckpt_ref)}`."
        ]
    lines += ["| kimg | FID | extractor | samples | reference |", "|---|---|---|---|---|"]
    lines += [
        f"| {r['kimg']:g} | {float(r['fid']):.3f} | {r.get('extractor')} | {r.get('num_samples')} | "
        f"{r.get('reference')} |"
        for r in f.fid
    ]
    return lines + ["", "Measured along training with the sampler above on seeds 0 to samples−1."]


def _use(f: CardFacts) -> list[str]:
    where = " (run in the folder's parent directory):" if "/" not in f.ckpt_ref else ":"
    return [
        "",
        "## Use",
        "",
        "`samples.png` is reproduced, byte for byte on the same kind of device, by" + where,
        "",
        "```bash",
        sample_command(f.ckpt_ref),
        "```",
        "",
        "`--ckpt` takes the folder or its Hub repository id; `diffit eval-fid --ckpt` scores it the same way.",
        "",
    ]
