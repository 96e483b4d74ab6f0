"""Data sources share one contract; synthetic data is deterministic; bad data gives a clear DataError (also through
a loader's worker); latent shards; training and eval-fid read the same image set; datasets by name (torchvision's
CIFAR-10 files, a Hugging Face dataset saved locally) go through the same `Source` rules, offline; real datasets,
never a silent stand-in: a preset without data stops with the ways to supply it."""

import hashlib
import json
import pickle
import warnings
import zipfile

import numpy as np
import pytest
import torch
from helpers import TINY_UNET, invoke, set_flags
from PIL import Image

from diffit_cli.config import DataConfig, load_preset
from diffit_cli.data import (
    NO_LABEL,
    SYNTHETIC_CLASSES,
    DataError,
    ImageFolderSource,
    LatentShardSource,
    NpzSource,
    SyntheticShapes,
    center_crop_arr,
    make_loader,
    normalize_pixels,
    open_source,
    require_data,
    sample_latent,
    shard_name,
    write_manifest,
    write_shard,
)
from diffit_cli.errors import DiffitError


def _img(rng, h=40, w=48):
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def make_folder(root, classes=("b_dog", "a_cat"), per_class=3, size=(40, 48)):
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c / "deeper").mkdir(parents=True)
        for i in range(per_class):
            sub = root / c / ("deeper" if i == 0 else "")
            Image.fromarray(_img(rng, *size)).save(sub / f"{i}.png")
    return root


def make_zip(path, n=5, labels=True):
    rng = np.random.default_rng(1)
    with zipfile.ZipFile(path, "w") as z:
        names = [f"00000/img{i:08d}.png" for i in range(n)]
        for name in names:
            buf = __import__("io").BytesIO()
            Image.fromarray(_img(rng, 32, 32)).save(buf, format="PNG")
            z.writestr(name, buf.getvalue())
        meta = {"labels": [[name, i % 3] for i, name in enumerate(names)] if labels else None}
        z.writestr("dataset.json", json.dumps(meta))
    return path


def make_npz(path, n=6, res=32, labels=True):
    rng = np.random.default_rng(2)
    arrays = {"arr_0": rng.integers(0, 256, (n, res, res, 3), dtype=np.uint8)}
    if labels:
        arrays["arr_1"] = np.arange(n) % 2
    np.savez(path, **arrays)
    return path


def _check_contract(src, n, num_classes, res=32, channels=3):
    assert len(src) == n
    assert src.resolution == res and src.num_channels == channels
    assert src.num_classes == num_classes == len(src.class_names)
    for i in (0, n - 1):
        x, y = src[i]
        assert x.dtype == torch.uint8 and tuple(x.shape) == (channels, res, res)
        assert y.dtype == torch.int64 and y.ndim == 0
        assert (0 <= int(y) < num_classes) if num_classes else int(y) == NO_LABEL
    assert src.labels().shape == (n,)


@pytest.mark.parametrize("kind", ["folder", "root-folder", "zip", "zip-nolabels", "npz", "npz-nolabels", "synthetic"])
def test_every_source_shares_the_contract(tmp_path, kind):
    if kind == "folder":
        src, n, k = open_source(make_folder(tmp_path / "d"), 32), 6, 2
    elif kind == "root-folder":
        root = make_folder(tmp_path / "d")
        Image.fromarray(_img(np.random.default_rng(3))).save(root / "top.png")
        src, n, k = open_source(root, 32), 7, 0
    elif kind == "zip":
        src, n, k = open_source(make_zip(tmp_path / "d.zip"), 32), 5, 3
    elif kind == "zip-nolabels":
        src, n, k = open_source(make_zip(tmp_path / "d.zip", labels=False), 32), 5, 0
    elif kind == "npz":
        src, n, k = open_source(make_npz(tmp_path / "d.npz"), 32), 6, 2
    elif kind == "npz-nolabels":
        src, n, k = open_source(make_npz(tmp_path / "d.npz", labels=False), 32), 6, 0
    else:
        src, n, k = open_source(None, 32, synthetic_size=100), 100, len(SYNTHETIC_CLASSES)
    assert src.kind == "pixel"
    _check_contract(src, n, k)


def test_folder_classes_are_sorted_first_level_names(tmp_path):
    src = ImageFolderSource(make_folder(tmp_path / "d"), 32)
    assert src.class_names == ("a_cat", "b_dog")
    assert src.files[0] == "a_cat/1.png" and "a_cat/deeper/0.png" in src.files
    assert src.labels().tolist() == [0, 0, 0, 1, 1, 1]


def test_npz_keeps_stored_pixels_and_labels(tmp_path):
    path = make_npz(tmp_path / "d.npz")
    src = NpzSource(path, 32)
    assert isinstance(src._images, np.memmap)  # np.savez stores arrays uncompressed: mapped, not loaded
    arr = np.load(path)["arr_0"]
    np.savez_compressed(tmp_path / "c.npz", arr_0=arr)
    assert torch.equal(NpzSource(tmp_path / "c.npz", 32)[3][0], src[3][0])
    assert torch.equal(src[3][0], torch.from_numpy(arr[3].transpose(2, 0, 1).copy()))
    assert [int(src[i][1]) for i in range(6)] == [0, 1, 0, 1, 0, 1]
    np.savez(tmp_path / "nchw.npz", arr_0=np.zeros((2, 3, 8, 8), np.uint8))
    with pytest.raises(DataError, match="NHWC"):
        open_source(tmp_path / "nchw.npz", 8)


def test_xflip_doubles_with_mirrors(tmp_path):
    src = open_source(make_npz(tmp_path / "d.npz"), 32, xflip=True)
    assert len(src) == 12
    assert torch.equal(src[7][0], src[1][0].flip(2)) and int(src[7][1]) == int(src[1][1])


def test_synthetic_is_deterministic_and_classes_differ():
    a, b = SyntheticShapes(32, size=64), SyntheticShapes(32, size=64)
    assert torch.equal(a[17][0], b[17][0])
    assert not torch.equal(a[17][0], a[18][0])
    assert not torch.equal(a[17][0], SyntheticShapes(32, size=64, seed=1)[17][0])
    assert [int(a[i][1]) for i in range(10)] == [i % 8 for i in range(10)]
    assert len(SyntheticShapes(32)) == 50_000 and SyntheticShapes(32).class_names == SYNTHETIC_CLASSES
    assert SyntheticShapes(64, size=8)[0][0].shape == (3, 64, 64)
    assert SyntheticShapes(32, size=8, channels=1)[0][0].shape == (1, 32, 32)
    # the shape stands out from the background: the image has a real dynamic range
    x = torch.stack([a[i][0] for i in range(16)]).float()
    assert (x.amax(dim=(1, 2, 3)) - x.amin(dim=(1, 2, 3))).min() > 80


def test_simple_synthetic_style_is_centred_upright_and_bright_on_dark():
    from diffit_cli.config import load_preset

    at32 = ["data.synthetic=simple", "data.resolution=32", "model.img_resolution=32"]  # the thresholds below are 32²
    simple = open_source(load_preset("demo", at32).data, synthetic_size=64)
    assert isinstance(simple, SyntheticShapes) and simple.style == "simple"
    assert simple.fingerprint() != SyntheticShapes(32, size=64).fingerprint()
    v = torch.stack([simple[i][0] for i in range(64)]).amax(1)  # HSV value (64, 32, 32)
    fg = v > 150  # bright shapes (value ≥ 0.8, shading ≥ 0.82) on dark backgrounds (value ≤ 0.42)
    assert (v.flatten(1).median(1).values < 110).all()  # mostly dark background
    ys, xs = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    area = fg.sum((1, 2))
    cy, cx = (fg * ys).sum((1, 2)) / area, (fg * xs).sum((1, 2)) / area
    assert ((cy - 15.5).abs().max() < 5) and ((cx - 15.5).abs().max() < 5)  # near the centre
    assert area.float().mean() > 150 and area.min() > 60  # shapes of 55-75 % of the width
    squares = fg[1::8].float()  # class 1: upright squares fill their bounding box
    for m in squares:
        rows, cols = m.any(1).nonzero(), m.any(0).nonzero()
        box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
        assert m.sum() / box > 0.8
    with pytest.raises(Exception, match="synthetic"):
        load_preset("demo", ["data.synthetic=hard"])


def test_center_crop_and_resize_follow_adm(tmp_path):
    # 96×48 (w×h): thirds red / green / blue; the centre crop keeps the green middle
    arr = np.zeros((48, 96, 3), np.uint8)
    arr[:, :32, 0] = arr[:, 32:64, 1] = arr[:, 64:, 2] = 255
    (tmp_path / "d").mkdir()
    Image.fromarray(arr).save(tmp_path / "d" / "x.png")
    x = open_source(tmp_path / "d", 16)[0][0]
    assert x.shape == (3, 16, 16)
    assert x[1, :, 4:12].min() > 200 and x[0, :, 4:12].max() < 60
    big = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 200, 3), dtype=np.uint8))
    assert center_crop_arr(big, 64).shape == (64, 64, 3)
    up = open_source(make_npz(tmp_path / "s.npz", res=8), 32)[0][0]
    assert up.shape == (3, 32, 32)
    assert normalize_pixels(torch.tensor([0, 255], dtype=torch.uint8)).tolist() == [-1.0, 1.0]


def test_corrupt_image_names_the_file(tmp_path):
    root = make_folder(tmp_path / "d")
    bad = root / "a_cat" / "2.png"
    bad.write_bytes(b"not a png at all")
    src = open_source(root, 32)
    with pytest.raises(DataError) as e:
        src[src.files.index("a_cat/2.png")]
    assert str(bad) in str(e.value) and "--skip-bad-images" in str(e.value)
    truncated = root / "b_dog" / "2.png"
    truncated.write_bytes(truncated.read_bytes()[:100])
    with pytest.raises(DataError, match="b_dog/2.png"):
        src[src.files.index("b_dog/2.png")]


def test_skip_mode_replaces_bad_images_with_a_warning(tmp_path):
    root = make_folder(tmp_path / "d")
    (root / "a_cat" / "2.png").write_bytes(b"")
    src = open_source(root, 32, skip_bad_images=True)
    i = src.files.index("a_cat/2.png")
    with pytest.warns(UserWarning, match="2.png"):
        x, y = src[i]
    assert torch.equal(x, src[i + 1][0]) and int(y) == 0  # the next readable item, deterministically
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        src[i]  # warned once per file
    cfg = DataConfig(path=str(root), resolution=32)
    assert len(open_source(cfg, skip_bad_images=True)) == 6


def test_worker_errors_are_reraised_cleanly(tmp_path):
    root = make_folder(tmp_path / "d")
    (root / "a_cat" / "1.png").write_bytes(b"garbage")
    loader = make_loader(open_source(root, 32), 6, num_workers=1, shuffle=False)
    with pytest.raises(DataError) as e:
        next(iter(loader))
    assert "Traceback" not in str(e.value) and str(root / "a_cat" / "1.png") in str(e.value)


def test_missing_empty_and_unreachable_data(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        open_source(tmp_path / "nope", 32)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images"):
        open_source(tmp_path / "empty", 32)
    with pytest.raises(DataError, match="positive"):
        open_source(None, 0)
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(DataError, match="cannot tell"):
        open_source(tmp_path / "f.txt", 32)
    (tmp_path / "bad.zip").write_bytes(b"zip?")
    with pytest.raises(DataError, match="zip"):
        open_source(tmp_path / "bad.zip", 32)
    root = make_folder(tmp_path / "d")
    Image.fromarray(_img(np.random.default_rng(0))).save(root / "top.png")
    with pytest.raises(DataError, match="no class labels"):
        open_source(DataConfig(path=str(root), resolution=32, use_labels=True))


def _latent_folder(root, n=5, shard=2, res=64, complete=True):
    root.mkdir()
    g = torch.Generator().manual_seed(0)
    mean, std = torch.randn(n, 2, 4, res // 8, res // 8, generator=g), torch.rand(n, 2, 4, res // 8, res // 8) + 0.1
    labels = torch.arange(n) % 3
    shards = []
    for k, a in enumerate(range(0, n, shard)):
        write_shard(root / shard_name(k), mean[a : a + shard], std[a : a + shard], labels[a : a + shard], torch.float32)
        shards.append({"file": shard_name(k), "count": min(shard, n - a)})
    write_manifest(
        root,
        {
            "format": "diffit-latents",
            "version": 1,
            "complete": complete,
            "resolution": res,
            "latent_channels": 4,
            "latent_size": res // 8,
            "scaling_factor": 0.18215,
            "class_names": ["a", "b", "c"],
            "count": n,
            "shard_size": shard,
            "shards": shards,
            "dtype": "float32",
        },
    )
    return mean, std, labels


def test_latent_shard_source(tmp_path):
    mean, std, labels = _latent_folder(tmp_path / "lat")
    src = open_source(tmp_path / "lat")
    assert isinstance(src, LatentShardSource) and src.kind == "latent"
    assert (len(src), src.resolution, src.num_channels, src.num_classes, src.latent_size) == (5, 64, 4, 3, 8)
    x, y = src[3]
    assert x.shape == (2, 2, 4, 8, 8) and torch.equal(x[0], mean[3]) and torch.equal(x[1], std[3]) and int(y) == 0
    assert src.labels().tolist() == labels.tolist()
    batch = next(iter(make_loader(src, 4, num_workers=0, shuffle=False)))
    assert batch[0].shape == (4, 2, 2, 4, 8, 8)
    with pytest.raises(DataError, match="encode-latents"):
        open_source(DataConfig(path=str(tmp_path / "lat"), resolution=128, space="latent", channels=4, vae="x"))
    _latent_folder(tmp_path / "partial", complete=False)
    with pytest.raises(DataError, match="incomplete"):
        open_source(tmp_path / "partial")


def test_sample_latent_picks_mirrors_and_scales():
    mean = torch.stack([torch.zeros(8, 4, 2, 2), torch.ones(8, 4, 2, 2)], dim=1)  # mirror entries = 1
    stats = torch.stack([mean, torch.zeros_like(mean)], dim=1).half()  # (B, 2, 2, C, h, w), std 0
    z = sample_latent(stats, scale=0.5, generator=torch.Generator().manual_seed(0))
    assert z.dtype == torch.float32 and z.shape == (8, 4, 2, 2)
    picks = z.flatten(1).mean(1)
    assert set(picks.tolist()) == {0.0, 0.5}
    assert sample_latent(stats, xflip=False).abs().max() == 0
    stats[:, 1] = 1  # std 1: noise; replayable from the global RNG state
    torch.manual_seed(3)
    a = sample_latent(stats)
    torch.manual_seed(3)
    assert torch.equal(a, sample_latent(stats)) and a.std() > 0.1


@pytest.mark.parametrize("container", ["folder", "zip"])
def test_training_and_fid_read_the_same_image_set(tmp_path, container):
    """`train --data` and `eval-fid` read the same images: one extension list and one hidden-file rule."""
    from diffit_cli.fid.inputs import open_input

    root = tmp_path / "imgs"
    files = {
        "a/1.png": "PNG",
        "a/2.JPEG": "JPEG",
        "b/3.webp": "WEBP",
        "b/4.Tif": "TIFF",
        "b/5.gif": "GIF",
        ".ipynb_checkpoints/a/6.png": "PNG",
        "a/.7.png": "PNG",
        "__MACOSX/a/8.png": "PNG",
    }
    for i, (name, fmt) in enumerate(files.items()):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((8, 8, 3), 25 * i, np.uint8)).save(root / name, format=fmt)
    (root / "a" / "notes.txt").write_text("not an image")
    (root / "b" / "labels.json").write_text("{}")
    path = root
    if container == "zip":
        path = tmp_path / "imgs.zip"
        with zipfile.ZipFile(path, "w") as z:
            for f in sorted(root.rglob("*")):
                if f.is_file():
                    z.write(f, f.relative_to(root).as_posix())
    train_src = open_source(str(path), 8)
    fid_src = open_input(path, "samples", allow_stats=False)
    assert train_src.files == ["a/1.png", "a/2.JPEG", "b/3.webp", "b/4.Tif", "b/5.gif"]
    assert fid_src.count == len(train_src) == 5
    train_pixels = np.stack([train_src[i][0].numpy().transpose(1, 2, 0) for i in range(5)])
    np.testing.assert_array_equal(np.concatenate(list(fid_src.batches(2))), train_pixels)


# ----------------------------------------------------------------------------- datasets by name, presets without data
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
TINY_CIFAR = [s for s in TINY_UNET if not s.startswith(("model.num_classes", "data.use_labels"))] + [
    "model.num_classes=10",
    "data.use_labels=true",
    "model.dropout=0",
    "train.augment_p=0",
]


def fake_cifar10(root, per_batch=40):
    """torchvision's CIFAR-10 python layout (five training batches, a test batch, batches.meta) with random
    images; returns the training images (N, 32, 32, 3), labels and the files' md5 sums."""
    folder = root / "torchvision" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    md5, images, labels = {}, [], []
    for name in [f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)  # rows: R plane, G plane, B plane
        y = rng.integers(0, 10, per_batch).tolist()
        (folder / name).write_bytes(pickle.dumps({"batch_label": name, "data": data, "labels": y}))
        if name != "test_batch":
            images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            labels += y
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": CLASSES, "num_vis": 3072}))
    for f in folder.iterdir():
        md5[f.name] = hashlib.md5(f.read_bytes()).hexdigest()
    return np.concatenate(images), np.array(labels), md5


@pytest.fixture
def cifar_checksums(monkeypatch):
    """torchvision verifies the md5 of every CIFAR-10 file against the real archive's; fake files cannot match
    those, so the test points torchvision's own table at the fake files' sums: its integrity check still runs
    (a changed byte fails it, see below), only the expected values are the test's."""
    from torchvision.datasets import CIFAR10

    def use(md5):
        monkeypatch.setattr(CIFAR10, "train_list", [[f"data_batch_{k}", md5[f"data_batch_{k}"]] for k in range(1, 6)])
        monkeypatch.setattr(CIFAR10, "test_list", [["test_batch", md5["test_batch"]]])
        monkeypatch.setattr(CIFAR10, "meta", dict(CIFAR10.meta, md5=md5["batches.meta"]))

    return use


def test_cifar10_by_name_offline_without_files_exits_2_naming_the_cache(cache, tmp_path):
    r = invoke("train", "--preset", "cifar10", "--run-dir", str(tmp_path / "run"))
    assert r.exit_code == 2, r.output
    assert "torchvision:CIFAR10" in r.output and str(cache / "torchvision") in r.output
    assert "downloads are off" in r.output and "cifar-10-python.tar.gz" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "run").exists()


@pytest.mark.e2e
def test_cifar10_trains_on_the_torchvision_files_in_the_cache(cache, tmp_path, cifar_checksums):
    images, labels, md5 = fake_cifar10(cache)
    cifar_checksums(md5)
    src = open_source(load_preset("cifar10").data)
    assert src.name == "torchvision:CIFAR10" and len(src) == 200 and src.class_names == tuple(CLASSES)
    np.testing.assert_array_equal(src.labels(), labels)
    for i in (0, 77, 199):
        x, y = src[i]
        assert torch.equal(x, torch.from_numpy(images[i].transpose(2, 0, 1).copy())) and int(y) == labels[i]

    sets = set_flags(TINY_CIFAR)
    r = invoke("train", "--preset", "cifar10", "--run-dir", str(tmp_path / "run"), *sets)
    assert r.exit_code == 0, r.output
    assert (tmp_path / "run" / "checkpoints" / "latest.pt").exists()

    (cache / "torchvision" / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"changed")  # checksum fails
    r = invoke("train", "--preset", "cifar10", "--run-dir", str(tmp_path / "run2"), *sets)
    assert r.exit_code == 2 and "torchvision:CIFAR10" in r.output and "fail torchvision's checksum check" in r.output


def _hf_dataset(root, image=True):
    import datasets

    rng = np.random.default_rng(1)
    rows = {"label": [i % 3 for i in range(12)], "caption": [f"item {i}" for i in range(12)]}
    features = {"label": datasets.ClassLabel(names=["red", "green", "blue"]), "caption": datasets.Value("string")}
    if image:
        rows["picture"] = [Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)) for _ in range(12)]
        features["picture"] = datasets.Image()
    ds = datasets.Dataset.from_dict(rows, features=datasets.Features(features))
    ds.save_to_disk(str(root))
    return ds


@pytest.mark.e2e
def test_hf_dataset_saved_locally_trains_offline_with_its_labels(tmp_path, cache):
    from diffit_cli.data.images import pil_to_chw

    ds = _hf_dataset(tmp_path / "shapes")
    src = open_source(f"hf:{tmp_path / 'shapes'}", 16)
    assert src.image_column == "picture" and src.class_names == ("red", "green", "blue")
    np.testing.assert_array_equal(src.labels(), np.arange(12) % 3)
    x, y = src[5]
    assert torch.equal(x, torch.from_numpy(pil_to_chw(ds[5]["picture"], 16, 3))) and int(y) == 2  # the crop rule

    ds.to_parquet(str(tmp_path / "shapes.parquet"))
    pq = open_source(f"hf:{tmp_path / 'shapes.parquet'}", 16)
    assert torch.equal(pq[5][0], x) and pq.class_names == src.class_names

    sets = set_flags(TINY_UNET + ["model.num_classes=3", "data.use_labels=true"])
    r = invoke(
        "train", "--preset", "demo", "--data", f"hf:{tmp_path / 'shapes'}", "--run-dir", str(tmp_path / "run"), *sets
    )
    assert r.exit_code == 0, r.output
    assert (tmp_path / "run" / "checkpoints" / "latest.pt").exists()


def test_hf_dataset_without_an_image_column_is_one_line_naming_its_columns(tmp_path, cache):
    _hf_dataset(tmp_path / "text", image=False)
    r = invoke("train", "--preset", "demo", "--data", f"hf:{tmp_path / 'text'}", "--run-dir", str(tmp_path / "run"))
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert "no image column (columns: label, caption)" in r.output and "data.image_column" in r.output
    assert len(r.output.strip().splitlines()) == 1
    r = invoke("train", "--preset", "demo", "--data", "hf:someone/not-cached", "--run-dir", str(tmp_path / "run"))
    assert r.exit_code == 2 and "hf:someone/not-cached" in r.output and "save_to_disk" in r.output


def test_ffhq64_without_data_exits_2_with_the_preparation_steps(tmp_path):
    r = invoke("train", "--preset", "ffhq64", "--run-dir", str(tmp_path / "run"))
    assert r.exit_code == 2 and "Traceback" not in r.output
    for step in (
        "FFHQ",
        "dataset_tool.py",
        "--resolution=64x64",
        "--data ffhq-64x64.zip",
        "hf:OWNER/NAME",
        "Getting the data",
    ):
        assert step in r.output, step
    assert not (tmp_path / "run").exists()
    with pytest.raises(DiffitError, match="encode-latents /data/imagenet/train"):
        require_data(load_preset("imagenet256"))


def test_synthetic_data_only_when_the_preset_says_so():
    demo = load_preset("demo")
    require_data(demo)  # demo needs nothing
    assert isinstance(open_source(demo.data, synthetic_size=8), SyntheticShapes)
    assert load_preset("demo", ["data.path=x.zip"]).data.synthetic is None  # a path makes the style moot
    with pytest.raises(DiffitError, match="names no training data"):
        open_source(load_preset("ffhq64").data)
    # a preset saved before data.synthetic could be empty always wrote a style: it trained on the shapes
    old = load_preset("ffhq64", ["data.synthetic=varied"])
    assert isinstance(open_source(old.data, 16, synthetic_size=8), SyntheticShapes)
