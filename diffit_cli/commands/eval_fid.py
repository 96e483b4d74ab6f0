"""`diffit eval-fid`: FID (and IS, KID, precision/recall) of samples against a reference, via torch-fidelity."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from diffit_cli.commands._common import PresetOpt, RichProgress, SetOpt, console, fail, user_errors
from diffit_cli.commands.sample import GuidanceOpt, GuideCkptOpt, ScaleOpt, check_sample_flags

HELP = """Score samples (image folder, .zip, or .npz with arr_0 uint8 NHWC) against --ref: images, or a
statistics file (EDM's cifar10-32x32.npz, ADM's VIRTUAL_imagenet256_labeled.npz, or one from --save-ref).
Without --ref, --preset NAME scores against the preset's eval.reference: for `train` (image-space presets) the
statistics of its training set, computed once and cached in $DIFFIT_CACHE/fid-refs.
With --save-ref FILE, SAMPLES is a dataset: its statistics are saved for later runs.

With --ckpt FILE (no SAMPLES), the checkpoint's EMA network samples --num images with its preset's sampler (split
across processes: `accelerate launch -m diffit_cli eval-fid --ckpt ...`) and they are scored, --repeats times with
seeds k*num ... (k+1)*num-1 for repeat k (EDM reports the minimum of three); the images are kept only with --keep.
--guidance, --guide-ckpt and --cfg-scale replace the preset's guidance, as for `diffit sample`."""


def _show(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    rows = [
        ("FD-DINOv2" if "fd_dinov2" in result else "FID", "fid", None),
        ("sFID", "sfid", None),
        ("Inception Score", "is_mean", "is_std"),
        ("KID", "kid_mean", "kid_std"),
        ("Precision", "precision", None),
        ("Recall", "recall", None),
    ]
    published = result.get("published")
    table = Table(title="Sample quality", title_justify="left")
    table.add_column("Metric")
    table.add_column("Value", justify="right")
    if published:
        table.add_column(f"Release ({published['table']})", justify="right")
        table.add_column("Δ", justify="right")
    for label, key, std in rows:
        if key in result:
            value = f"{result[key]:.4f}" + (f" ± {result[std]:.4f}" if std else "")
            cells = [label, value]
            if published:
                row = published["metrics"].get(key)
                diff = None if row is None else row["difference"]
                cells += ["–" if row is None else f"{row['release']:g}", "–" if diff is None else f"{diff:+.4f}"]
            table.add_row(*cells)
    ref = result["reference"]
    if ref is not None:
        kind = "statistics file" if result["reference_kind"] == "stats" else "images"
        count = f", {result['num_reference']:,} images" if result["num_reference"] else ""
        ref = f"{ref} ({kind}{count})"
    out = Console()
    out.print(table)
    out.print(f"samples:   {result['samples']} ({result['num_samples']:,} images)", highlight=False)
    out.print(f"reference: {ref or 'none'}", highlight=False)
    out.print(f"extractor: {result['extractor']} on {result['device']}", highlight=False)
    out.print(f"protocol:  {_PROTOCOL_TEXT.get(result['protocol'], result['protocol'])}", highlight=False)
    if published:
        out.print(f"release:   {published['source']}", highlight=False)
        if not published["comparable"]:
            out.print(
                "[yellow]note:[/] no difference to the release's values: they compare only with Inception "
                "features, 50,000 samples and ADM's protocol",
                highlight=False,
            )
    for note in result["notes"]:
        out.print(f"[yellow]note:[/] {note}", highlight=False)


_PROTOCOL_TEXT = {
    "adm": "adm (ADM evaluator: IS over in-order splits of 5,000, k-NN precision/recall in its float16 distances)",
    "torch-fidelity": "torch-fidelity (IS over 10 shuffled splits, precision/recall in float32)",
}


SamplesArg = typer.Argument(None, help="Image folder, .zip, or .npz (arr_0 uint8 NHWC). With --save-ref: the dataset.")
RefOpt = typer.Option(None, "--ref", "-r", help="Image folder, .zip, .npz of images, or a mu/sigma statistics .npz.")
MetricsOpt = typer.Option(
    "fid", "--metrics", "-m", help="Comma-separated: fid, sfid (ADM's spatial FID), is, kid, pr (precision/recall)."
)
BatchOpt = typer.Option(
    None, "--batch", min=1, help="Images per feature-extraction batch (default 64; --ckpt: eval.batch)."
)
DeviceOpt = typer.Option(None, "--device", help="cpu or cuda (default: cuda when available).")
WeightsOpt = typer.Option(None, "--inception-weights", help="Local Inception weights file (offline machines).")
Dinov2WeightsOpt = typer.Option(
    None,
    "--dinov2-weights",
    help="Local DINOv2 ViT-L/14 state dict (dinov2_vitl14_pretrain.pth) for --feature-extractor dinov2-vit-l-14.",
)
ExtractorOpt = typer.Option(
    None,
    "--feature-extractor",
    help="torch-fidelity extractor name (default inception-v3-compat; dinov2-vit-l-14 or dinov2-vit-l14: FD-DINOv2 "
    "with EDM2's preprocessing; diffit-randconv-v1: offline smoke test).",
)
SaveRefOpt = typer.Option(None, "--save-ref", help="Save mu/sigma of SAMPLES (a dataset) to this .npz and exit.")
ProtocolOpt = typer.Option(
    "auto",
    "--protocol",
    help="IS and precision/recall conventions: adm (ADM's evaluator), torch-fidelity, or auto (adm for an ADM "
    "reference batch).",
)
JsonOpt = typer.Option(None, "--json", help="Also write the results to this JSON file.")
DataOpt = typer.Option(None, "--data", "-d", help="With --preset: the training data (as for `diffit train`).")
CkptOpt = typer.Option(
    None,
    "--ckpt",
    help="Sample this checkpoint (.pt/.safetensors, exported folder, REPO:FILE, OWNER/NAME) and score it.",
)
NumOpt = typer.Option(None, "--num", min=2, help="--ckpt: images per repeat (default: the preset's eval.num_samples).")
RepeatsOpt = typer.Option(1, "--repeats", min=1, help="--ckpt: score this many seed ranges.")
KeepOpt = typer.Option(None, "--keep", help="--ckpt: keep the sampled PNGs in this (new or empty) folder.")
ClassesOpt = typer.Option(
    None,
    "--classes",
    help="--ckpt: random (labels drawn per seed, ADM's protocol) or balanced (num / class count per class, the "
    "first num mod class-count classes one more; seed at position j: class j mod class count). Default: eval.classes.",
)


def _weights_for(feature_extractor, inception_weights, dinov2_weights):
    """The one weights file the chosen extractor reads: --dinov2-weights goes with DINOv2, --inception-weights with
    the others."""
    from diffit_cli.fid.extractors import DINOV2, canonical_extractor

    is_dinov2 = canonical_extractor(feature_extractor or "") == DINOV2
    if dinov2_weights is not None and not is_dinov2:
        fail(f"--dinov2-weights goes with --feature-extractor {DINOV2} (FD-DINOv2)")
    if inception_weights is not None and is_dinov2:
        fail(f"--inception-weights does not go with --feature-extractor {DINOV2}; pass --dinov2-weights PATH")
    return dinov2_weights if is_dinov2 else inception_weights


def register(app: typer.Typer) -> None:
    app.command("eval-fid", help=HELP)(eval_fid_cmd)


@user_errors
def eval_fid_cmd(
    samples: Path = SamplesArg,
    ref: Path | None = RefOpt,
    metrics: str = MetricsOpt,
    batch: int | None = BatchOpt,
    device: str | None = DeviceOpt,
    inception_weights: Path | None = WeightsOpt,
    dinov2_weights: Path | None = Dinov2WeightsOpt,
    feature_extractor: str | None = ExtractorOpt,
    save_ref: Path | None = SaveRefOpt,
    json_out: Path | None = JsonOpt,
    protocol: str = ProtocolOpt,
    preset: str | None = PresetOpt,
    data: str | None = DataOpt,
    overrides: list[str] | None = SetOpt,
    ckpt: str | None = CkptOpt,
    num: int | None = NumOpt,
    repeats: int = RepeatsOpt,
    keep: Path | None = KeepOpt,
    classes: str | None = ClassesOpt,
    guidance: str | None = GuidanceOpt,
    guide_ckpt: str | None = GuideCkptOpt,
    cfg_scale: float | None = ScaleOpt,
) -> None:
    from diffit_cli.fid.adm import PROTOCOLS
    from diffit_cli.fileio import check_writable, write_json

    for out in (save_ref, json_out):  # before anything is sampled or computed, not after
        if out is not None:
            check_writable(out)
    inception_weights = _weights_for(feature_extractor, inception_weights, dinov2_weights)
    sample = _guidance_flags(guidance, guide_ckpt, cfg_scale)
    if protocol not in PROTOCOLS:
        fail(f"--protocol {protocol!r}: choose {', '.join(PROTOCOLS)}")
    if ckpt is not None:
        if protocol != "auto":
            fail("--protocol goes with SAMPLES; --ckpt always uses auto (ADM's conventions for an ADM reference batch)")
        if samples is not None or save_ref is not None or device is not None:
            fail(
                "--ckpt samples the checkpoint itself and scores it: drop SAMPLES, --save-ref and --device "
                "(launch with accelerate to use several GPUs)"
            )
        result = _score_checkpoint(
            ckpt, num, repeats, ref, batch, feature_extractor, keep, inception_weights, classes, metrics, sample
        )
    else:
        if num is not None or repeats != 1 or keep is not None or classes is not None or sample:
            fail("--num, --repeats, --keep, --classes and the guidance flags go with --ckpt (sampling a checkpoint)")
        if samples is None:
            fail("give SAMPLES (images to score), or --ckpt FILE to sample a checkpoint")
        if save_ref is not None and ref is not None:
            fail("--save-ref summarises SAMPLES (a dataset) into FILE; it takes no --ref")
        if preset is None and (data is not None or overrides):
            fail("--data and --set describe a preset's training data: pass --preset NAME too")
        common = dict(batch=batch or 64, device=device, feature_extractor=feature_extractor)
        common["inception_weights"] = inception_weights
        result = _score_samples(samples, ref, metrics, save_ref, preset, data, overrides, common, protocol)
    if result is not None and json_out is not None:
        write_json(json_out, result)


def _score_samples(samples, ref, metrics, save_ref, preset, data, overrides, common: dict, protocol="auto") -> dict:
    """Score SAMPLES against --ref (or the preset's reference), or with --save-ref save their statistics; print
    what was found."""
    from diffit_cli.fid import metrics as M

    with RichProgress() as progress:
        if save_ref is not None:
            result = M.save_reference(samples, save_ref, progress=progress, **common)
        else:
            described = None
            if ref is None and preset is not None:
                ref, described = _preset_reference(preset, data, overrides, common, progress)
            result = M.compute_metrics(samples, ref, metrics=metrics, progress=progress, protocol=protocol, **common)
            if described is not None and described != ref:
                result["notes"].insert(0, f"reference: statistics of {described}")
    if save_ref is not None:
        console.print(
            f"Saved statistics of {result['num_images']:,} images "
            f"({result['extractor']}, {result['dim']} features) to {result['path']}",
            highlight=False,
        )
    else:
        _show(result)
    return result


def _preset_reference(preset, data, overrides, common: dict, progress):
    """The reference a preset's `eval.reference` names (for `train`, its training set's cached statistics), and
    what it describes."""
    from diffit_cli.config import load_preset
    from diffit_cli.fid.extractors import INCEPTION
    from diffit_cli.fid.reference import preset_reference

    sets = list(overrides or []) + ([f"data.path={json.dumps(data)}"] if data is not None else [])
    return preset_reference(
        load_preset(preset, sets),
        batch=common["batch"],
        progress=progress,
        feature_extractor=common["feature_extractor"] or INCEPTION,
        inception_weights=common["inception_weights"],
    )


def _guidance_flags(mode: str | None, guide: str | None, scale: float | None) -> dict:
    """The `sample` values the guidance flags set (those given), checked before any file is read."""
    values = {"guidance.mode": mode, "guidance.guide": guide, "guidance.scale": scale}
    check_sample_flags(values)
    return {k: v for k, v in values.items() if v is not None}


def _guided(r: dict) -> str:
    """', autoguidance w=… by GUIDE' / ', CFG w=…' for the summary line, '' when unguided."""
    g = r.get("guidance") or {}
    if g.get("scale", 1.0) == 1.0:
        return ""
    if g.get("mode") == "auto":
        return f", autoguidance w={g['scale']:g} by {r['guide']}"
    return f", CFG w={g['scale']:g} ({g['schedule']})"


def _score_checkpoint(
    ckpt, num, repeats, ref, batch, feature_extractor, keep, inception_weights, classes, metrics, sample=None
) -> dict | None:
    """Sample and score a checkpoint; print each repeat's FID (and the other --metrics) and the FIDs' minimum, mean
    and standard deviation."""
    from diffit_cli.fid.score import score_checkpoint

    if classes is not None and classes not in ("random", "balanced"):
        fail(f"--classes {classes!r}: choose random or balanced")
    with RichProgress() as progress:
        r = score_checkpoint(
            ckpt,
            num,
            repeats=repeats,
            reference=ref,
            batch=batch,
            feature_extractor=feature_extractor,
            keep=keep,
            classes=classes,
            inception_weights=inception_weights,
            progress=progress,
            metrics=metrics,
            sample=sample,
        )
    if r is None:  # not the main process
        return None
    from rich.console import Console

    out = Console()
    for k, rep in enumerate(r["repeats"]):
        others = "".join(f"  {key} {rep[key]:.4f}" for key in rep if key not in ("seeds", "fid"))
        out.print(f"FID repeat {k} (seeds {rep['seeds']}): {rep['fid']:.4f}{others}", highlight=False)
    out.print(
        f"FID over {len(r['values'])} repeat{'s' * (len(r['values']) > 1)} of {r['num']:,} images: "
        f"min {r['min']:.4f}  mean {r['mean']:.4f}  std {r['std']:.4f}",
        highlight=False,
    )
    out.print(
        f"reference: {r['reference']}; extractor: {r['extractor']}; sampler: {r['sampler']}, "
        f"{r['steps']} steps, EMA weights, {r['classes']} labels" + _guided(r),
        highlight=False,
    )
    for note in r["notes"]:
        out.print(f"[yellow]note:[/] {note}", highlight=False)
    return r
