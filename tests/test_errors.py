"""The reliability contract as one table: every user error of the five commands exits 2 with a short
message that names the problem, prints no traceback, and leaves every file that existed before unchanged.

Each row is (argv, words the message must contain, optional fault); `{w}` in argv is the fixture world below, built
once: images, broken datasets, presets, checkpoints, statistics files, earlier outputs. A fault simulates what a
test cannot make for real as root: a read-only directory, a full disk.
"""

from __future__ import annotations

import errno
import hashlib
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TINY_UNET, fake_latent_shards, invoke, set_flags, tiny_unet, tiny_vit, weights_state
from PIL import Image

from diffit_cli.checkpoint import save_checkpoint

TINY = set_flags(TINY_UNET)
RANDCONV = ["--feature-extractor", "diffit-randconv-v1"]
VAE_ARGS = ["--vae", "{w}/vae/folder", "--resolution", "32", "--workers", "0", "--device", "cpu"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Every fixture file the rows refer to, and outputs of earlier successful runs (for recipe changes)."""
    from helpers import save_tiny_vae

    w = tmp_path_factory.mktemp("world")
    rng = np.random.default_rng(0)
    for folder, n in (("imgs", 6), ("imgs_bad", 3)):
        (w / folder).mkdir()
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(w / folder / f"{i}.png")
    (w / "imgs_bad" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    for name in ("cat", "dog", "fox"):  # three classes, one subfolder each
        (w / "classes" / name).mkdir(parents=True)
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(w / "classes" / name / "0.png")
    (w / "empty").mkdir()
    (w / "texts").mkdir()
    (w / "texts" / "a.txt").write_text("not an image")
    (w / "corrupt.zip").write_bytes(b"PK\x03\x04 this is no zip")
    np.savez(w / "float.npz", rng.random((4, 16, 16, 3)).astype(np.float32))
    np.savez(w / "flat.npz", rng.integers(0, 256, (4, 256), dtype=np.uint8))
    np.savez(w / "stats_bad.npz", foo=np.zeros(3))
    (w / "blocker").write_text("a file where a folder is needed")
    (w / "readonly").mkdir()
    (w / "broken.yaml").write_text("model: [unclosed\n")
    (w / "list.yaml").write_text("- a\n- b\n")
    (w / "notes.txt").write_text("these are not Inception weights")
    fake_latent_shards(w / "latents4", size=4)  # 32 px latents for a 64 px preset
    save_tiny_vae(w / "vae")

    p = tiny_unet()
    torch.manual_seed(0)
    from diffit_cli.build import build_network

    net = build_network(p.model)
    save_checkpoint(w / "run", weights_state(p, net), 0, keep=1)
    ckpt = w / "run" / "checkpoints" / "ckpt-00000000.000.pt"
    (w / "ckpt.pt").write_bytes(ckpt.read_bytes())
    (w / "truncated.pt").write_bytes(ckpt.read_bytes()[:2000])
    (w / "random.pt").write_bytes(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    from safetensors.torch import save_file

    vit = build_network(tiny_vit().model)
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, w / "vit.safetensors")

    for args in (
        ["sample", "--ckpt", str(ckpt), "--seeds", "0-1", "--out", str(w / "old.npz")],
        ["sample", "--ckpt", str(ckpt), "--seeds", "0-1", "--out", str(w / "old_png")],
        ["eval-fid", str(w / "imgs"), "--save-ref", str(w / "stats.npz"), *RANDCONV],
        ["encode-latents", str(w / "imgs"), str(w / "lat"), *[a.format(w=w) for a in VAE_ARGS]],
        ["train", "--run-dir", str(w / "trained"), *TINY, "--set", "train.total_kimg=0.008"],
    ):
        r = invoke(*args)
        assert r.exit_code == 0, (args, r.output)
    return w


def _row(argv, *words, fault=None, id=None):
    return pytest.param(argv, words, fault, id=id or " ".join(argv)[:70])


ROWS = [
    # ---------------------------------------------------------------- preset errors
    _row(["train", "--preset", "nosuch"], "nosuch", "cifar10", id="preset: unknown name"),
    _row(["train", "--preset", "{w}/missing.yaml"], "missing.yaml", id="preset: missing file"),
    _row(["train", "--set", "model.nosuch=1"], "nosuch", id="preset: unknown key"),
    _row(["train", "--set", "train.batch=abc"], "train.batch", id="preset: wrong type"),
    _row(["train", "--set", "train.lr=-1"], "train.lr", id="preset: out of range"),
    _row(["train", "--preset", "{w}/broken.yaml"], "broken.yaml", "yaml", id="preset: broken YAML"),
    _row(["train", "--preset", "{w}/list.yaml"], "list.yaml", "mapping", id="preset: not a mapping"),
    _row(
        ["train", "--set", "model.channels=[16, 16]", "--set", "model.blocks=[1]"],
        "blocks",
        id="preset: inconsistent stages",
    ),
    _row(["train", "--set", "train.batch"], "key=value", id="preset: --set without ="),
    _row(["train", "--set", "train.on_spike=explode"], "on_spike", "rollback", id="preset: bad on_spike"),
    _row(["train", "--set", "train.mixed_precision=fp8"], "mixed_precision", "bf16", id="preset: bad precision"),
    _row(["train", "--set", "sample.sampler=foo"], "sampler", "heun", id="preset: bad sampler"),
    _row(["train", "--set", "train.ema_decay=0.5"], "ema", id="preset: two EMAs"),
    _row(["train", "--set", "data.space=latent"], "data.vae", id="preset: latent without VAE"),
    _row(
        ["sample", "--ckpt", "{w}/ckpt.pt", "--set", "model.depth=3", "--out", "{w}/o.npz"],
        "sample.",
        id="sample: --set outside sample.*",
    ),
    _row(["ablate", "nosuch"], "nosuch", id="ablate: unknown study"),
    _row(["ablate", "window-size", "--budget", "huge"], "huge", "tiny", id="ablate: bad budget"),
    _row(["ablate", "window-size", "--only", "novariant", "--dry-run"], "novariant", id="ablate: unknown variant"),
    _row(
        ["ablate", "cfg-scale", "--dry-run", "--set", "sample.guidance.mode=auto"],
        "guiding network",
        "--guide-checkpoint",
        id="ablate: autoguidance without a guide",
    ),
    _row(
        ["ablate", "window-size", "--guide-checkpoint", "{w}/ckpt.pt", "--runs-dir", "{w}/ws"],
        "--guide-checkpoint",
        "only sample",
        id="ablate: a guide for a training study",
    ),
    # ---------------------------------------------------------------- data errors
    _row(["train", "--data", "{w}/nope", *TINY], "nope", "does not exist", id="data: missing"),
    _row(["train", "--data", "{w}/empty", *TINY, "--run-dir", "{w}/new"], "no images", id="data: empty folder"),
    _row(["train", "--data", "{w}/texts", *TINY, "--run-dir", "{w}/new"], "no images", id="data: not images"),
    _row(["train", "--data", "{w}/corrupt.zip", *TINY, "--run-dir", "{w}/new"], "corrupt.zip", id="data: corrupt zip"),
    _row(
        ["train", "--data", "{w}/imgs_bad", *TINY, "--run-dir", "{w}/new"],
        "broken.png",
        "--skip-bad-images",
        id="data: corrupt image",
    ),
    _row(
        ["train", "--data", "{w}/float.npz", *TINY, "--run-dir", "{w}/new"], "float.npz", "uint8", id="data: npz dtype"
    ),
    _row(["train", "--data", "{w}/flat.npz", *TINY, "--run-dir", "{w}/new"], "flat.npz", id="data: npz shape"),
    _row(
        [
            "train",
            "--data",
            "{w}/imgs",
            *TINY,
            "--set",
            "data.use_labels=true",
            "--set",
            "model.num_classes=4",
            "--run-dir",
            "{w}/new",
        ],
        "label",
        id="data: labels absent",
    ),
    _row(
        ["train", "--data", "{w}/imgs", *TINY, "--set", "model.num_classes=4", "--run-dir", "{w}/new"],
        "no class labels",
        "model.num_classes=0",
        id="data: a conditional network on unlabelled data",
    ),
    _row(
        ["train", "--data", "{w}/classes", *TINY, "--set", "model.num_classes=2", "--run-dir", "{w}/new"],
        "3 classes",
        "model.num_classes=3",
        id="data: more classes than the network has",
    ),
    _row(
        [
            "train",
            "--preset",
            "imagenet256",
            "--data",
            "{w}/latents4",
            "--set",
            "model.input_size=8",
            "--set",
            "data.resolution=64",
            "--run-dir",
            "{w}/new",
        ],
        "resolution",
        id="data: latent resolution",
    ),
    _row(["eval-fid", "{w}/nope", "--ref", "{w}/stats.npz", *RANDCONV], "nope", id="eval-fid: samples missing"),
    _row(["eval-fid", "{w}/empty", "--ref", "{w}/stats.npz", *RANDCONV], "no images", id="eval-fid: samples empty"),
    _row(["eval-fid", "{w}/imgs", "--ref", "{w}/nope.npz", *RANDCONV], "nope.npz", id="eval-fid: ref missing"),
    _row(
        ["eval-fid", "{w}/imgs", "--ref", "{w}/stats_bad.npz", *RANDCONV],
        "stats_bad.npz",
        id="eval-fid: ref of no known layout",
    ),
    _row(["eval-fid", "{w}/imgs_bad", "--ref", "{w}/stats.npz", *RANDCONV], "broken.png", id="eval-fid: corrupt image"),
    _row(
        ["eval-fid", "{w}/corrupt.zip", "--ref", "{w}/stats.npz", *RANDCONV], "corrupt.zip", id="eval-fid: corrupt zip"
    ),
    _row(
        ["eval-fid", "{w}/imgs", "--ref", "{w}/stats.npz", "--protocol", "tf", *RANDCONV],
        "--protocol 'tf'",
        "adm",
        id="eval-fid: unknown protocol",
    ),
    _row(
        ["eval-fid", "--ckpt", "{w}/ckpt.pt", "--protocol", "adm"],
        "--protocol",
        "SAMPLES",
        id="eval-fid: ckpt protocol",
    ),
    _row(["encode-latents", "{w}/nope", "{w}/lat2", *VAE_ARGS], "nope", id="encode: source missing"),
    _row(["encode-latents", "{w}/empty", "{w}/lat2", *VAE_ARGS], "no images", id="encode: no images"),
    _row(
        ["encode-latents", "{w}/empty", "{w}/lat2", "--vae", "nobody/novae"],
        "no images",
        id="encode: inputs checked before the VAE",
    ),
    _row(["encode-latents", "{w}/corrupt.zip", "{w}/lat2", *VAE_ARGS], "corrupt.zip", id="encode: corrupt zip"),
    _row(["encode-latents", "{w}/imgs_bad", "{w}/lat2", *VAE_ARGS], "broken.png", id="encode: corrupt image"),
    _row(["encode-latents", "{w}/lat", "{w}/lat2", *VAE_ARGS], "latents", id="encode: latents as source"),
    # ---------------------------------------------------------------- checkpoint errors
    _row(["sample", "--ckpt", "{w}/missing.pt", "--out", "{w}/o"], "missing.pt", id="ckpt: missing"),
    _row(["sample", "--ckpt", "{w}/random.pt", "--out", "{w}/o"], "random.pt", id="ckpt: corrupt"),
    _row(["sample", "--ckpt", "{w}/truncated.pt", "--out", "{w}/o"], "truncated.pt", id="ckpt: truncated"),
    _row(
        ["sample", "--ckpt", "{w}/vit.safetensors", "--preset", "demo", "--out", "{w}/o"],
        "vit.safetensors",
        id="ckpt: safetensors of another architecture",
    ),
    _row(
        ["sample", "--ckpt", "{w}/vit.safetensors", "--out", "{w}/o"], "--preset", id="ckpt: weights without a preset"
    ),
    _row(
        ["sample", "--ckpt", "nobody/nothing:model.safetensors", "--out", "{w}/o"],
        "nobody/nothing",
        id="ckpt: Hub reference offline",
    ),
    _row(
        ["eval-fid", "{w}/imgs", "--ref", "{w}/imgs", "--inception-weights", "{w}/notes.txt"],
        "notes.txt",
        id="weights: not a weights file",
    ),
    _row(
        ["eval-fid", "{w}/imgs", "--ref", "{w}/imgs", "--inception-weights", "{w}/none.pt"],
        "none.pt",
        id="weights: missing file",
    ),
    _row(["eval-fid", "{w}/imgs", "--ref", "{w}/imgs"], "offline", id="weights: Inception offline"),
    _row(
        ["eval-fid", "{w}/imgs", "--ref", "{w}/imgs", "--feature-extractor", "dinov2-vit-l14"],
        "dinov2_vitl14_pretrain.pth",
        "--dinov2-weights",
        id="weights: DINOv2 offline",
    ),
    _row(
        ["eval-fid", "{w}/imgs", "--ref", "{w}/imgs", "--dinov2-weights", "{w}/none.pt"],
        "--feature-extractor dinov2-vit-l-14",
        id="weights: --dinov2-weights without DINOv2",
    ),
    _row(
        ["train", "--run-dir", "{w}/trained", *TINY, "--set", "train.lr=0.5"],
        "train.lr",
        "--force",
        id="recipe: train with a changed preset",
    ),
    # ---------------------------------------------------------------- output paths
    _row(["train", "--run-dir", "{w}/blocker", *TINY], "blocker", "in the way", id="out: run dir is a file"),
    _row(["train", "--run-dir", "{w}/blocker/run", *TINY], "blocker", "in the way", id="out: run dir below a file"),
    _row(
        ["train", "--run-dir", "{w}/readonly/run", *TINY],
        "readonly",
        "read-only",
        fault=("EROFS", "readonly"),
        id="out: run dir read-only",
    ),
    _row(
        ["train", "--run-dir", "{w}/full", *TINY],
        "full",
        "disk is full",
        fault=("ENOSPC", "full"),
        id="out: train on a full disk",
    ),
    _row(
        ["sample", "--ckpt", "{w}/ckpt.pt", "--seeds", "0-1", "--out", "{w}/blocker/png"],
        "blocker",
        "in the way",
        id="out: sample folder below a file",
    ),
    _row(
        ["sample", "--ckpt", "{w}/ckpt.pt", "--seeds", "0-1", "--out", "{w}/blocker/s.npz"],
        "blocker",
        "in the way",
        id="out: sample npz below a file",
    ),
    _row(
        ["sample", "--ckpt", "{w}/ckpt.pt", "--seeds", "0-1", "--out", "{w}/blocker"],
        "blocker",
        "in the way",
        id="out: sample folder is a file",
    ),
    _row(
        ["sample", "--ckpt", "{w}/ckpt.pt", "--seeds", "0-1", "--out", "{w}/readonly/s.npz"],
        "readonly",
        "read-only",
        fault=("EROFS", "readonly"),
        id="out: sample read-only",
    ),
    _row(
        ["sample", "--ckpt", "{w}/ckpt.pt", "--seeds", "0-1", "--out", "{w}/full.npz"],
        "full.npz",
        "disk is full",
        fault=("ENOSPC", "full.npz"),
        id="out: sample on a full disk",
    ),
    _row(
        ["sample", "--ckpt", "{w}/ckpt.pt", "--seeds", "0-1", "--out", "{w}/o", "--grid", "{w}/blocker/g.png"],
        "blocker",
        "in the way",
        id="out: grid below a file",
    ),
    _row(
        ["eval-fid", "{w}/imgs", "--save-ref", "{w}/blocker/ref.npz", *RANDCONV],
        "blocker",
        "in the way",
        id="out: save-ref below a file",
    ),
    _row(
        ["eval-fid", "{w}/imgs", "--ref", "{w}/stats.npz", "--json", "{w}/blocker/r.json", *RANDCONV],
        "blocker",
        "in the way",
        id="out: --json below a file",
    ),
    _row(
        ["eval-fid", "{w}/imgs", "--save-ref", "{w}/full.npz", *RANDCONV],
        "full.npz",
        "disk is full",
        fault=("ENOSPC", "full.npz"),
        id="out: save-ref on a full disk",
    ),
    _row(["encode-latents", "{w}/imgs", "{w}/blocker", *VAE_ARGS], "blocker", id="out: encode out is a file"),
    _row(
        ["encode-latents", "{w}/imgs", "{w}/blocker/lat", *VAE_ARGS],
        "blocker",
        "in the way",
        id="out: encode out below a file",
    ),
    _row(
        ["encode-latents", "{w}/imgs", "{w}/readonly/lat", *VAE_ARGS],
        "readonly",
        "read-only",
        fault=("EROFS", "readonly"),
        id="out: encode read-only",
    ),
    _row(
        ["encode-latents", "{w}/imgs", "{w}/fulllat", *VAE_ARGS],
        "fulllat",
        "disk is full",
        fault=("ENOSPC", "fulllat"),
        id="out: encode on a full disk",
    ),
    _row(
        ["ablate", "window-size", "--runs-dir", "{w}/blocker", "--only", "w4"],
        "blocker",
        "in the way",
        id="out: ablate runs dir is a file",
    ),
    # ---------------------------------------------------------------- enumerated flags
    _row(["sample", "--ckpt", "{w}/ckpt.pt", "--sampler", "foo"], "sampler", "heun", id="enum: --sampler"),
    _row(
        ["sample", "--ckpt", "{w}/ckpt.pt", "--cfg-schedule", "foo"],
        "schedule",
        "power-cosine",
        id="enum: --cfg-schedule",
    ),
    _row(["sample", "--ckpt", "{w}/ckpt.pt", "--cfg-channels", "7"], "channels", id="enum: --cfg-channels 7"),
    _row(["sample", "--ckpt", "{w}/ckpt.pt", "--cfg-channels", "some"], "channels", id="enum: --cfg-channels some"),
    _row(["sample", "--ckpt", "{w}/ckpt.pt", "--precision", "fp8"], "precision", "bf16", id="enum: --precision"),
    _row(["sample", "--ckpt", "{w}/ckpt.pt", "--classes", "abc", "--out", "{w}/o"], "classes", id="enum: --classes"),
    _row(["sample", "--ckpt", "{w}/ckpt.pt", "--seeds", "5-1"], "seed", id="enum: --seeds backwards"),
    _row(["sample", "--ckpt", "{w}/ckpt.pt", "--seeds", "a-b"], "seed", id="enum: --seeds not numbers"),
    _row(["encode-latents", "{w}/imgs", "{w}/lat2", "--precision", "fp8"], "fp8", id="enum: encode --precision"),
    _row(["encode-latents", "{w}/imgs", "{w}/lat2", "--dtype", "int8"], "int8", id="enum: encode --dtype"),
    _row(["encode-latents", "{w}/imgs", "{w}/lat2", "--device", "tpu"], "tpu", id="enum: encode --device"),
    _row(
        ["eval-fid", "{w}/imgs", "--ref", "{w}/stats.npz", "--metrics", "foo", *RANDCONV], "foo", id="enum: --metrics"
    ),
    _row(
        ["eval-fid", "{w}/imgs", "--ref", "{w}/stats.npz", "--feature-extractor", "foo"],
        "foo",
        id="enum: --feature-extractor",
    ),
    _row(
        ["eval-fid", "{w}/imgs", "--ref", "{w}/stats.npz", "--device", "tpu", *RANDCONV],
        "tpu",
        id="enum: eval-fid --device",
    ),
    # ---------------------------------------------------------------- numeric ranges
    _row(["sample", "--ckpt", "{w}/ckpt.pt", "--steps", "0"], "steps", id="range: --steps 0"),
    _row(["sample", "--ckpt", "{w}/ckpt.pt", "--batch", "0"], "batch", id="range: sample --batch 0"),
    _row(["sample", "--ckpt", "{w}/ckpt.pt", "--cfg-scale", "-1"], "cfg-scale", id="range: --cfg-scale -1"),
    _row(
        ["sample", "--ckpt", "{w}/ckpt.pt", "--classes", "3", "--out", "{w}/o"],
        "classes",
        "unconditional",
        id="range: --classes on an unconditional model",
    ),
    _row(["train", "--kimg", "0", *TINY], "kimg", id="range: --kimg 0"),
    _row(["train", "--batch-gpu", "0", *TINY], "batch-gpu", id="range: --batch-gpu 0"),
    _row(["train", "--batch-gpu", "3", *TINY], "batch", id="range: --batch-gpu not a divisor"),
    _row(["encode-latents", "{w}/imgs", "{w}/lat2", "--resolution", "30"], "resolution", id="range: resolution 30"),
    _row(["encode-latents", "{w}/imgs", "{w}/lat2", "--batch", "0"], "batch", id="range: encode --batch 0"),
    _row(["encode-latents", "{w}/imgs", "{w}/lat2", "--shard-size", "0"], "shard-size", id="range: --shard-size 0"),
    _row(["encode-latents", "{w}/imgs", "{w}/lat2", "--workers", "-1"], "workers", id="range: --workers -1"),
    _row(["encode-latents", "{w}/imgs", "{w}/lat2", "--max-images", "0"], "max-images", id="range: --max-images 0"),
    _row(
        ["eval-fid", "{w}/imgs", "--ref", "{w}/stats.npz", "--batch", "0", *RANDCONV],
        "batch",
        id="range: eval-fid --batch 0",
    ),
    # ---------------------------------------------------------------- recipe changes on existing outputs
    _row(
        ["sample", "--ckpt", "{w}/ckpt.pt", "--seeds", "0-1", "--out", "{w}/old.npz", "--steps", "3"],
        "steps",
        "--force",
        id="recipe: npz with other steps",
    ),
    _row(
        ["sample", "--ckpt", "{w}/ckpt.pt", "--seeds", "0-1", "--out", "{w}/old_png", "--sampler", "euler"],
        "sampler",
        "--force",
        id="recipe: png folder with another sampler",
    ),
    _row(
        ["sample", "--ckpt", "{w}/ckpt.pt", "--seeds", "0-1", "--out", "{w}/old.npz", "--raw"],
        "weights",
        "--force",
        id="recipe: npz with raw weights",
    ),
    _row(
        ["encode-latents", "{w}/imgs", "{w}/lat", *VAE_ARGS[:-2], "--resolution", "24", "--device", "cpu"],
        "resolution",
        "--force",
        id="recipe: latents at another resolution",
    ),
    _row(
        ["encode-latents", "{w}/imgs_bad", "{w}/lat", *VAE_ARGS, "--skip-bad-images"],
        "source",
        "--force",
        id="recipe: latents of another source",
    ),
]


def _tree(root: Path) -> dict[str, str]:
    """Every file under `root` → its hash (a symlink → where it points)."""
    return {
        str(p.relative_to(root)): f"-> {p.readlink()}" if p.is_symlink() else hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() or p.is_symlink()
    }


def _inject(monkeypatch, world: Path, fault) -> None:
    """A read-only directory (EROFS) or a full disk (ENOSPC) under `world / where`, raised where files are made."""
    import diffit_cli.fileio as F

    code, where = fault
    target = str(world / where)
    mkstemp, mkdir = tempfile.mkstemp, Path.mkdir

    def refuse(path):
        if str(path).startswith(target):
            raise OSError(
                getattr(errno, code),
                {"EROFS": "Read-only file system", "ENOSPC": "No space left on device"}[code],
                str(path),
            )

    def fake_mkstemp(*a, dir=None, prefix="", **k):
        refuse(Path(dir) / prefix.lstrip("."))  # the temporary file beside the target: `.NAME.xxxx.tmp`
        return mkstemp(*a, dir=dir, prefix=prefix, **k)

    def fake_mkdir(self, *a, **k):
        if code == "EROFS":
            refuse(self)
        return mkdir(self, *a, **k)

    monkeypatch.setattr(F.tempfile, "mkstemp", fake_mkstemp)
    monkeypatch.setattr(Path, "mkdir", fake_mkdir)


@pytest.mark.parametrize("argv, words, fault", ROWS)
def test_contract(world, monkeypatch, argv, words, fault):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(world)  # default output paths (runs/, samples/) land in the world and are checked too
    before = _tree(world)
    if fault:
        _inject(monkeypatch, world, fault)
    r = invoke(*(a.format(w=world) for a in argv))
    out = r.output
    assert r.exit_code == 2, out
    assert "Traceback" not in out and "weights_only" not in out, out
    flat = " ".join(out.split()).lower()
    joined = "".join(out.split()).lower()  # paths broken across lines by the terminal width
    for word in words:
        assert word.format(w=world).lower() in flat or word.lower() in joined, (word, out)
    assert len(out.strip().splitlines()) <= 8, out  # one message (click's usage errors take a small box)
    after = _tree(world)
    assert {k: after.get(k) for k in before} == before, "a file that existed before was changed or removed"
    assert not set(after) - set(before), f"left behind: {sorted(set(after) - set(before))}"


def test_the_table_covers_the_contract():
    """All five commands and every class of user error have rows; every row names words its message must contain
    (without them a row passes on any exit-2 message) and has an id of its own (a copied row checks nothing new)."""
    assert [row.id for row in ROWS if not row.values[1]] == [], "rows that check no words of the message"
    ids = [row.id for row in ROWS]
    assert sorted({i for i in ids if ids.count(i) > 1}) == [], "rows with the same id"
    commands = {row.values[0][0] for row in ROWS}
    assert commands == {"train", "sample", "eval-fid", "encode-latents", "ablate"}
    classes = {row.id.split(":")[0] for row in ROWS}
    assert classes == {
        "preset",
        "sample",
        "ablate",
        "data",
        "eval-fid",
        "encode",
        "ckpt",
        "weights",
        "recipe",
        "out",
        "enum",
        "range",
    }


# a bad value, flag or preset file: exactly one line naming the flag or key, the value and what is accepted
ONE_LINE = [
    _row(
        ["train", "--dry-run", "--set", "sample.guidance.channels=nope"],
        "sample.guidance.channels = 'nope'",
        "an integer ≥ 1 or all",
        id="int or 'all'",
    ),
    _row(["train", "--dry-run", "--set", "train.compile=maybe"], "train.compile = 'maybe'", "true, false or auto"),
    _row(["train", "--dry-run", "--set", "data.use_labels=maybe"], "data.use_labels = 'maybe'", "choose true or false"),
    _row(["train", "--dry-run", "--set", "train.augment_p=2"], "train.augment_p = 2", "≥ 0 and ≤ 1"),
    _row(["train", "--dry-run", "--set", "train.on_spike=off"], "train.on_spike = false", "warn, stop or rollback"),
    _row(["train", "--dry-run", "--preset", "{w}/broken.yaml"], "broken.yaml:2:1", "flow sequence opened at 1:8"),
    _row(
        ["train", "--dry-run", "--set", "eval.feature_extractor=nope"],
        "eval.feature_extractor = 'nope'",
        "inception-v3-compat",
        "diffit-randconv-v1",
        id="dry run: unknown extractor, FID along training off",
    ),
    _row(["train", "--dry-run", "--data", "torchvision:NOPE"], "'NOPE'", "CIFAR10", id="dry run: unknown torchvision"),
    _row(
        ["train", "--dry-run", "--data", "torchvision:CIFAR10:val"], "train and test", id="dry run: torchvision split"
    ),
    _row(["train", "--dry-run", "--data", "hf:"], "'hf:'", "hf:OWNER/NAME", id="dry run: hf without a name"),
    _row(["train", "--dry-run", "--set", 'data.path="{w}/nope"'], "nope", "does not exist", id="dry run: data.path"),
    _row(["train", "--dry-run", "--data", "{w}/notes.txt"], "notes.txt", "image folder", id="dry run: not data"),
    _row(["train", "--dry-run", "--log-with", "nope"], "'nope'", "tensorboard", id="dry run: unknown tracker"),
    _row(["train", "--dry-run", "--batch-gpu", "7"], "--batch-gpu 7", id="dry run: batch split"),
    _row(
        ["eval-fid", "{w}/imgs", "--ref", "{w}/stats.npz", "--feature-extractor", "foo"],
        "--feature-extractor 'foo'",
        "inception-v3-compat",
        "diffit-randconv-v1",
        id="eval-fid: unknown extractor",
    ),
    _row(["sample", "--ckpt", "{w}/ckpt.pt", "--cfg-channels", "nope"], "--cfg-channels 'nope'", "≥ 1 or all"),
    _row(["sample", "--ckpt", "{w}/ckpt.pt", "--cfg-schedule", "x"], "--cfg-schedule 'x'", "power-cosine or interval"),
    _row(
        ["sample", "--ckpt", "{w}/ckpt.pt", "--set", "sample.guidance.channels=nope", "--out", "{w}/o"],
        "sample.guidance.channels = 'nope'",
        "≥ 1 or all",
        id="sample --set",
    ),
    _row(
        ["eval-fid", "{w}/imgs", "--preset", "demo", "--set", "sample.sampler=foo", *RANDCONV],
        "sample.sampler = 'foo'",
        "heun, euler, ddpm, ddim or dpmpp-2m",
        id="eval-fid --set: a choice",
    ),
    _row(
        ["eval-fid", "{w}/imgs", "--preset", "demo", "--set", "eval.num_samples=0", *RANDCONV],
        "eval.num_samples = 0",
        "an integer ≥ 1",
        id="eval-fid --set: a range",
    ),
]


@pytest.mark.parametrize("argv, words, fault", ONE_LINE)
def test_a_bad_value_is_one_line(world, monkeypatch, argv, words, fault):
    """The message names the flag or key, the value and the choices or range, in one line (no pydantic text, no
    parser context), exit 2; a dry run refuses what the run would refuse before its first step."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(world)
    r = invoke(*(a.format(w=world) for a in argv))
    out = r.output
    assert r.exit_code == 2, out
    assert len(out.strip().splitlines()) == 1, out
    for word in words:
        assert word.format(w=world) in out, (word, out)
    for internal in ("Traceback", "constrained-int", "literal[", "Input should", 'in "<unicode string>"'):
        assert internal not in out, out


@pytest.mark.parametrize(
    "argv, words",
    [
        (["sample", "--ckpt", "x.pt", "--steps", "0"], ["--steps", "'0'", "greater than or equal to 1"]),
        (["sample", "--ckpt", "x.pt", "--steps", "abc"], ["--steps", "'abc'", "integer"]),
        (["train", "--no-such-flag"], ["--no-such-flag", "diffit train -h"]),
        (["no-such-command"], ["no-such-command", "diffit -h"]),
        (["plot"], ["Missing argument", "diffit plot -h"]),
    ],
)
def test_a_usage_error_is_one_line(argv, words):
    """What the parser refuses (an unknown flag or command, a value outside a flag's type or range) is one line
    naming it and exit 2, through the real entry point, not click's usage box."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "diffit_cli", *argv], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    lines = [line for line in (r.stdout + r.stderr).splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), lines
    for word in words:
        assert word in lines[0], (word, lines[0])
