"""The recipe of a `diffit sample` output (`sample.json`, or `<name>.sample.json` beside an `.npz`): everything that
decides an image besides its seed, written before the first image, and the check that a resumed run makes the same
images (a changed recipe is refused, or cleared with `force`)."""

from __future__ import annotations

from pathlib import Path

from diffit_cli.config import GuidanceConfig, Preset
from diffit_cli.errors import DiffitError
from diffit_cli.fileio import read_json, strict_json, write_json
from diffit_cli.sampling.weights import GuideSnapshot, weights_sha256


def sample_recipe(
    path: Path,
    preset: Preset,
    *,
    raw: bool,
    vae_id: str | None,
    precision: str,
    classes: str | None,
    guide: GuideSnapshot | None = None,
) -> dict:
    """Everything that decides an image besides its seed (s_max may be inf: "inf"); the guiding network by the hash
    of its weights, as the checkpoint (its path is recorded with the finished output)."""
    cfg = preset.sample
    return strict_json(
        {
            "checkpoint_sha256": weights_sha256(path),
            "guide_sha256": None if guide is None else guide.sha256,
            "weights": "raw" if raw else "ema",
            "preset": preset.name,
            "sampler": cfg.sampler,
            "steps": cfg.steps,
            "guidance": _guidance(cfg.guidance),
            "stochastic": {
                "s_churn": cfg.s_churn,
                "s_min": cfg.s_min,
                "s_max": cfg.s_max,
                "s_noise": cfg.s_noise,
                "eta": cfg.eta,
            },
            "vae": vae_id,
            "precision": precision,
            "classes": classes or "random",
        }
    )


def _guidance(g: GuidanceConfig) -> dict:
    """The guidance settings that change the images: the guide by its hash (`guide_sha256`), not its path, and
    `channels` only for CFG (autoguidance guides every channel)."""
    return g.model_dump(mode="json", exclude={"guide", "channels"} if g.mode == "auto" else {"guide"})


def check_recipe(recipe_path: Path, recipe: dict, out: Path, force: bool, sink, main: bool) -> None:
    """Refuse (or with `force`, clear) output made with another recipe; record this one before any image is written,
    so a killed run is checked too."""
    old = strict_json(read_json(recipe_path)) if recipe_path.is_file() else None  # (earlier files: Infinity)
    if old is not None and isinstance(old.get("guidance"), dict):  # a recipe that names no mode is CFG's
        old["guidance"] = {"mode": "cfg", **old["guidance"]}
        if old["guidance"]["mode"] == "auto":  # `channels` does not change autoguided images (`_guidance`)
            old["guidance"].pop("channels", None)
    changed = [k for k in recipe if old is not None and old.get(k) != recipe[k]]
    if changed and not force:
        raise DiffitError(
            f"{str(out)!r} holds samples made with another recipe (changed: {', '.join(changed)}); "
            "rerun with the same settings, choose another --out, or pass --force to replace them"
        )
    if main:
        if changed:
            sink.clear()
        if old is None or changed:
            write_json(recipe_path, {**recipe, "complete": False})


def compact_seeds(seeds: list[int]) -> str:
    """[0, 1, 2, 5] → '0-2,5' (the --seeds syntax)."""
    parts, start = [], None
    for a, b in zip(seeds, seeds[1:] + [None]):
        start = a if start is None else start
        if b != a + 1:
            parts.append(f"{start}-{a}" if a != start else f"{a}")
            start = None
    return ",".join(parts)
