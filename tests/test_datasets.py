"""Real datasets, never a silent stand-in (issue 15): a preset without data stops with the ways to supply it;
datasets by name (torchvision's CIFAR-10 files, a Hugging Face dataset saved locally) train through the same
`Source` rules, offline; the training set's FID statistics are computed once and reused."""

import hashlib
import pickle

import numpy as np
import pytest
import torch
from helpers import TINY_UNET, invoke, set_flags
from PIL import Image

from diffit_cli.config import load_preset
from diffit_cli.data import SyntheticShapes, open_source, require_data
from diffit_cli.errors import DiffitError

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
