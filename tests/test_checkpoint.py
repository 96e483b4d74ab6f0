"""Checkpoints: atomic writes, the latest pointer, keep-last-K, safe loading, release-format import."""

import os
import stat

import pytest
import torch
from helpers import (
    TINY_UNET,
    TINY_VIT,
    invoke,
    save_self_describing_safetensors,
    set_flags,
    tiny_unet,
    tiny_vit,
    weights_state,
)

from diffit_cli import checkpoint as ck
from diffit_cli.build import build_network
from diffit_cli.config import load_preset
from diffit_cli.fileio import atomic_write_bytes


def test_latest_and_keep(tmp_path):
    p = tiny_unet()
    net = build_network(p.model)
    for nimg in (8, 16, 24, 32):
        ck.save_checkpoint(tmp_path, weights_state(p, net), nimg, keep=2)
    files = sorted(f.name for f in (tmp_path / "checkpoints").glob("ckpt-*.pt"))
    assert files == [ck.checkpoint_name(24), ck.checkpoint_name(32)]
    assert ck.latest_checkpoint(tmp_path).name == ck.checkpoint_name(32)


def test_crash_mid_write_keeps_previous_latest(tmp_path, monkeypatch):
    p = tiny_unet()
    net = build_network(p.model)
    ck.save_checkpoint(tmp_path, weights_state(p, net), 8, keep=3)

    def crashing_save(obj, f):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(ck.torch, "save", crashing_save)
    with pytest.raises(KeyboardInterrupt):
        ck.save_checkpoint(tmp_path, weights_state(p, net), 16, keep=3)
    assert ck.latest_checkpoint(tmp_path).name == ck.checkpoint_name(8)
    assert [f.name for f in (tmp_path / "checkpoints").iterdir() if f.name.startswith(".")] == []
    ck.load_checkpoint(ck.latest_checkpoint(tmp_path))  # still loads


def test_corrupt_and_foreign_files(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a zip")
    with pytest.raises(ck.CheckpointError, match="corrupt"):
        ck.load_checkpoint(bad)
    torch.save({"weights": torch.zeros(1)}, tmp_path / "foreign.pt")
    with pytest.raises(ck.CheckpointError, match="not a diffit"):
        ck.load_checkpoint(tmp_path / "foreign.pt")
    with pytest.raises(ck.CheckpointError, match="does not exist"):
        ck.load_snapshot(tmp_path / "missing.pt")


def test_snapshot_roundtrip_pt_and_safetensors(tmp_path):
    p = tiny_unet()
    net = build_network(p.model)
    ck.save_checkpoint(tmp_path, weights_state(p, net), 8, keep=1)
    loaded, preset = ck.load_snapshot(ck.latest_checkpoint(tmp_path))
    assert preset == p
    for (k, a), (_, b) in zip(net.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k
    save_self_describing_safetensors(tmp_path / "w.safetensors", net, p)
    loaded2, preset2 = ck.load_snapshot(tmp_path / "w.safetensors")
    assert preset2 == p and all(
        torch.equal(a, b) for a, b in zip(net.state_dict().values(), loaded2.state_dict().values())
    )


def test_release_style_file_needs_preset_and_matching_shapes(tmp_path):
    from safetensors.torch import save_file

    p = tiny_vit()
    net = build_network(p.model)
    sd = {k: v.contiguous() for k, v in net.state_dict().items()}
    save_file(sd, tmp_path / "release.safetensors")  # no preset metadata, like NVIDIA's files
    with pytest.raises(ck.CheckpointError, match="--preset"):
        ck.load_snapshot(tmp_path / "release.safetensors")
    loaded, _ = ck.load_snapshot(tmp_path / "release.safetensors", preset=p)
    assert all(torch.equal(a, b) for a, b in zip(sd.values(), loaded.state_dict().values()))
    wrong = load_preset("imagenet256", [s for s in TINY_VIT if "hidden" not in s] + ["model.hidden_size=64"])
    with pytest.raises(ck.CheckpointError, match="x_embedder.proj.weight"):
        ck.load_snapshot(tmp_path / "release.safetensors", preset=wrong)


def test_strip_prefixes():
    sd = {"module._orig_mod.a": 1, "module.b": 2, "c": 3}
    assert ck.strip_prefixes(sd) == {"a": 1, "b": 2, "c": 3}


def test_a_full_disk_while_checkpointing_keeps_the_previous_one_and_exits_2(tmp_path, monkeypatch):
    """ENOSPC inside a checkpoint write: one line naming the file, the previous checkpoint and the
    latest pointer intact, no temporary file left."""
    import errno

    real_save, calls = torch.save, []

    def save(obj, f, *a, **k):
        calls.append(1)
        if len(calls) == 2:  # the second checkpoint
            f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", save)
    args = set_flags(TINY_UNET)
    r = invoke("train", "--run-dir", str(tmp_path / "run"), *args)
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    flat = " ".join(r.output.split())
    assert "ckpt-00000000.032.pt" in "".join(r.output.split()) and "the disk is full" in flat
    folder = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["ckpt-00000000.016.pt", "latest.pt"]  # no .tmp left
    assert ck.load_checkpoint(ck.latest_checkpoint(tmp_path / "run"))["nimg"] == 16


def test_a_new_run_without_room_for_two_checkpoints_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    """The free space for two checkpoints is checked before the first one, with the numbers."""
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    args = set_flags(TINY_UNET)
    with monkeypatch.context() as m:
        m.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
        r = invoke("train", "--run-dir", str(tmp_path / "run"), *args)
    flat = " ".join(r.output.split())
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    assert "1.0 kB free" in flat and "2 checkpoints of" in flat and "--run-dir" in flat
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "preset.yaml").exists()
    estimate = float(flat.split("2 checkpoints of ")[1].split(" kB")[0]) * 1000
    assert invoke("train", "--run-dir", str(tmp_path / "run"), *args).exit_code == 0
    actual = ck.latest_checkpoint(tmp_path / "run").stat().st_size
    assert 0.9 < estimate / actual < 1.1  # the tensors and their zip records; the preset text is left out


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_written_files_get_the_usual_permissions(tmp_path, umask):
    """Atomic writes go through a temporary file that mkstemp makes 0600: checkpoints, grids and curves of a run
    folder shared with a group were unreadable to it. They get what open() would give under the umask."""
    old = os.umask(umask)
    try:
        path = atomic_write_bytes(tmp_path / "f.bin", b"x")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
