"""Preset schema: shipped presets validate, typos/wrong types are rejected with the key, overrides round-trip."""

from pathlib import Path

import pydantic
import pytest
import yaml

from diffit_cli.config import (
    PresetError,
    available_presets,
    check_sample_values,
    diff_presets,
    dump_preset,
    load_preset,
    preset_from_yaml,
    preset_to_dict,
)

PAPER = ["cifar10", "demo", "ffhq64", "imagenet256", "imagenet512"]
# every preset file on disk is validated: a new one needs no edit here
ON_DISK = sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "presets").glob("*.yaml"))


def test_all_presets_shipped():
    """The paper's presets are found by name, and the wheel carries every preset file: pyproject.toml maps presets/
    to the package diffit_cli.presets and its package data takes each file there (an editable install reads the
    folder itself, so only the packaging rules can show this)."""
    import fnmatch

    tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11's tomllib")
    root = Path(__file__).resolve().parents[1]
    assert set(PAPER) <= set(available_presets())
    setup = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert setup["package-dir"]["diffit_cli.presets"] == "presets" and "diffit_cli.presets" in setup["packages"]
    patterns = setup["package-data"]["diffit_cli.presets"]
    files = sorted(p.name for p in (root / "presets").iterdir() if p.is_file())
    assert files and [f for f in files if not any(fnmatch.fnmatch(f, pat) for pat in patterns)] == []


@pytest.mark.parametrize("name", ON_DISK)
def test_preset_validates_and_round_trips(name, tmp_path):
    p = load_preset(name)
    assert p.name == name
    text = dump_preset(p)
    assert preset_from_yaml(text) == p
    f = tmp_path / "p.yaml"
    f.write_text(text)
    assert load_preset(f) == p
    assert dump_preset(load_preset(f)) == text


def test_paper_values():
    c, f = load_preset("cifar10"), load_preset("ffhq64")
    assert (c.model.channels, c.model.blocks, c.model.window_size) == ((128, 256, 256), (2, 2, 2), (4, 4, 4))
    assert (c.sample.steps, c.train.lr, c.train.batch, c.model.dropout, c.train.augment_p) == (
        18,
        1e-3,
        512,
        0.13,
        0.12,
    )
    assert (f.model.channels, f.model.blocks, f.model.window_size) == ((128, 256, 256, 256), (1, 2, 2, 2), (8,) * 4)
    assert (f.sample.steps, f.train.lr, f.train.batch, f.model.dropout, f.train.augment_p) == (
        40,
        2e-4,
        256,
        0.05,
        0.15,
    )
    i256, i512 = load_preset("imagenet256"), load_preset("imagenet512")
    assert (i256.model.depth, i256.model.hidden_size, i256.model.num_heads, i256.model.input_size) == (28, 1152, 16, 32)
    assert (i256.diffusion.kind, i256.diffusion.num_timesteps, i256.diffusion.schedule) == ("ddpm", 1000, "linear")
    assert (i256.train.lr, i256.train.batch, i256.train.ema_decay, i256.model.class_dropout_prob) == (
        3e-4,
        256,
        0.9999,
        0.1,
    )
    assert (
        i256.sample.steps,
        i256.sample.guidance.scale,
        i256.sample.guidance.schedule,
        i256.sample.guidance.power,
    ) == (250, 4.4, "power-cosine", 4.0)
    assert i256.sample.guidance.channels == 3
    assert (i512.model.input_size, i512.train.lr, i512.train.batch) == (64, 1e-4, 512)
    assert (i512.sample.guidance.scale, i512.sample.guidance.schedule) == (1.49, "constant")


def test_presets_are_frozen():
    p = load_preset("demo")
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        p.train.lr = 1.0


def test_override_applies_before_validation():
    p = load_preset("cifar10", ["train.lr=2e-4", "model.blocks=[4, 4, 4]", "sample.guidance.channels=2"])
    assert p.train.lr == 2e-4 and p.model.blocks == (4, 4, 4) and p.sample.guidance.channels == 2
    base = preset_to_dict(load_preset("cifar10"))
    assert diff_presets(base, preset_to_dict(p)) == ["model.blocks", "sample.guidance.channels", "train.lr"]
    assert preset_from_yaml(dump_preset(p)) == p


@pytest.mark.parametrize(
    "override, named",
    [
        (["model.chanels=[1]"], ["model.chanels", "did you mean 'channels'"]),
        (["train.lr=fast"], ["train.lr = 'fast'", "expected a number > 0"]),
        (["trian.lr=1"], ["trian", "unknown key"]),
        (["diffusion.kind=vp"], ["diffusion.kind = 'vp'", "choose edm, ddpm, edm-vp or edm-ve"]),
        (["model.window_size=[3, 3, 3]"], ["window size 3"]),
        (["train.augment_p=1.5"], ["train.augment_p = 1.5", "≤ 1"]),
        (["sample.guidance.scale=2"], ["class-conditional"]),
        (["sample.sampler=ddpm"], ["diffusion.kind ddpm"]),
        (
            ["model.num_classes=10", "sample.guidance.scale=2", "sample.guidance.schedule=power-cosine"],
            ["power-cosine"],
        ),
    ],
)
def test_bad_values_name_the_key(override, named):
    with pytest.raises(PresetError) as e:
        load_preset("cifar10", override)
    for text in named:
        assert text in str(e.value)


@pytest.mark.parametrize("bad", ["train.lr", "=3", "train..lr=1", "train.lr.x=1"])
def test_malformed_override(bad):
    with pytest.raises(PresetError, match="--set|section"):
        load_preset("cifar10", [bad])


def test_unknown_preset_lists_available():
    with pytest.raises(PresetError) as e:
        load_preset("cifar100")
    assert "cifar100" in str(e.value) and "ffhq64" in str(e.value)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(PresetError, match="does not exist"):
        load_preset(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(PresetError, match="not valid YAML"):
        load_preset(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text(yaml.safe_dump([1, 2]))
    with pytest.raises(PresetError, match="mapping"):
        load_preset(listy)


@pytest.mark.parametrize(
    "override, named",
    [  # Literal choices, int | Literal unions, bool | Literal, booleans, bounds, optional bounds, list items
        ("sample.guidance.channels=nope", ["sample.guidance.channels = 'nope'", "an integer ≥ 1 or all"]),
        ("sample.guidance.channels=0", ["sample.guidance.channels = 0", "an integer ≥ 1 or all"]),
        ("sample.sampler=foo", ["sample.sampler = 'foo'", "choose heun, euler, ddpm, ddim or dpmpp-2m"]),
        ("train.compile=maybe", ["train.compile = 'maybe'", "choose true, false or auto"]),
        ("data.use_labels=maybe", ["data.use_labels = 'maybe'", "choose true or false"]),
        ("train.on_spike=explode", ["train.on_spike = 'explode'", "choose warn, stop or rollback"]),
        ("train.batch=abc", ["train.batch = 'abc'", "an integer ≥ 1"]),
        ("train.lr=-1", ["train.lr = -1", "a number > 0"]),
        ("model.dropout=1", ["model.dropout = 1", "a number ≥ 0 and < 1"]),
        ("train.ema_decay=2", ["train.ema_decay = 2", "a number > 0 and < 1 or null"]),
        ("eval.metrics=[fid, foo]", ["eval.metrics[1] = 'foo'", "choose fid, sfid, is, kid or pr"]),
        ("train.betas=[0.9]", ["train.betas = [0.9]", "a list of 2 items, each a number"]),
        ("model.kind=foo", ["model.kind = 'foo'", "choose unet, vit, encdec or ddpmpp"]),
    ],
)
def test_a_bad_value_is_one_line_naming_key_value_and_choices(override, named):
    """pydantic's own text (`constrained-int`, `literal['all']`, one line per union branch) never reaches the user:
    one line with the key, the value given and what the field accepts."""
    with pytest.raises(PresetError) as e:
        load_preset("demo", [override])
    message = str(e.value)
    assert "\n" not in message, message
    for text in named:
        assert text in message, message
    for internal in ("constrained-int", "literal[", "Input should", "type="):
        assert internal not in message


def test_several_bad_values_are_one_line_each():
    with pytest.raises(PresetError) as e:
        load_preset("demo", ["train.lr=-1", "sample.sampler=foo"])
    lines = str(e.value).splitlines()
    assert len(lines) == 3 and "train.lr = -1" in lines[1] and "sample.sampler = 'foo'" in lines[2]


@pytest.mark.parametrize(
    "values, named",
    [
        ({"guidance.channels": "nope"}, ["--cfg-channels 'nope'", "an integer ≥ 1 or all"]),
        ({"sampler": "foo"}, ["--sampler 'foo'", "choose heun, euler, ddpm, ddim or dpmpp-2m"]),
        ({"guidance.schedule": "x"}, ["--cfg-schedule 'x'", "constant, power-cosine or interval"]),
        ({"steps": 0}, ["--steps 0", "an integer ≥ 1"]),
    ],
)
def test_a_bad_sampling_flag_is_one_line_naming_the_flag(values, named):
    from diffit_cli.commands.sample import SAMPLE_FLAGS

    with pytest.raises(PresetError) as e:
        check_sample_values(values, SAMPLE_FLAGS)
    message = str(e.value)
    assert "\n" not in message and "guidance." not in message, message
    for text in named:
        assert text in message, message


@pytest.mark.parametrize(
    "text, where, problem",
    [
        ("model:\n  kind: unet\n   bad: [1\n", ":3:7:", "mapping values are not allowed here"),
        ("model: [unclosed\n", ":2:1:", "flow sequence opened at 1:8"),
        ("a: 1\n\tb: 2\n", ":2:1:", "cannot start any token"),
    ],
)
def test_broken_yaml_is_one_line_with_line_and_column(tmp_path, text, where, problem):
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    with pytest.raises(PresetError) as e:
        load_preset(bad)
    message = str(e.value)
    assert "\n" not in message and f"{bad}{where}" in message and problem in message, message


def test_presets_ship_inside_the_wheel(tmp_path):
    """A non-editable install finds `--preset ffhq64` inside the package, not the source tree."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            str(root),
            "-w",
            str(tmp_path),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("diffit_cli-*.whl")
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
    )
    code = (
        "from diffit_cli.config import load_preset, preset_dir; import sys; d = preset_dir();"
        "assert str(d).startswith(sys.argv[1]), d; print(load_preset('ffhq64').name)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(target)],
        cwd=tmp_path,
        env={"PYTHONPATH": str(target)},
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ffhq64"


def test_schema_literals_equal_the_core_registries():
    """The preset schema and core/ name the same time modes, samplers, schedules and baseline parts."""
    from typing import get_args

    from diffit_cli.config import DDPMppConfig, EncDecConfig, GuidanceConfig, SampleConfig, UNetConfig, ViTConfig
    from diffit_cli.core.attention import TIME_MODES
    from diffit_cli.core.baselines import DECODERS, ENCODERS
    from diffit_cli.core.ddpmpp import ATTENTIONS
    from diffit_cli.core.guidance import SCHEDULES
    from diffit_cli.core.layers import TIME_EMBEDDINGS
    from diffit_cli.core.samplers import SAMPLERS

    def literal(model, field):
        return set(get_args(model.model_fields[field].annotation))

    assert literal(UNetConfig, "time_mode") == literal(ViTConfig, "time_mode") == set(TIME_MODES)
    assert literal(UNetConfig, "time_embedding") == set(TIME_EMBEDDINGS)
    assert literal(SampleConfig, "sampler") == set(SAMPLERS)
    assert literal(GuidanceConfig, "schedule") == set(SCHEDULES)
    assert literal(EncDecConfig, "encoder") == set(ENCODERS) and literal(EncDecConfig, "decoder") == set(DECODERS)
    assert literal(DDPMppConfig, "attention") == set(ATTENTIONS)


def test_guidance_is_one_subsection_and_old_flat_keys_still_read():
    from diffit_cli.core.guidance import Guidance
    from diffit_cli.sampling.generate import make_guidance

    p = load_preset("imagenet256")
    assert p.sample.guidance.model_dump() == {
        "mode": "cfg",
        "scale": 4.4,
        "schedule": "power-cosine",
        "power": 4.0,
        "channels": 3,
        "interval": (0.28, 5.42),
        "guide": None,
    }
    g = make_guidance(p.sample, p.model.num_classes)
    assert g == Guidance(scale=4.4, schedule="power-cosine", power=4.0, channels=3, null_class=1000)
    old = load_preset("imagenet256", ["sample.cfg_scale=4.6", "sample.cfg_channels=all"])  # checkpoints before
    assert old.sample.guidance.scale == 4.6 and old.sample.guidance.channels == "all"
    with pytest.raises(PresetError, match=r"guidance.channels 7: the model predicts 4 channels; use 1..4 or all"):
        load_preset("imagenet256", ["sample.guidance.channels=7"])
    # image presets guide every channel, so a grey (1-channel) variant needs no guidance setting
    assert load_preset("demo").sample.guidance.channels == "all"
    assert load_preset("demo", ["data.channels=1", "model.in_channels=1"]).sample.guidance.channels == "all"
    with pytest.raises(PresetError, match=r"guidance.channels 3: the model predicts 1 channels; use 1..1 or all"):
        load_preset("demo", ["data.channels=1", "model.in_channels=1", "sample.guidance.channels=3"])
    with pytest.raises(PresetError, match="σ_lo < σ_hi"):
        load_preset("imagenet256", ["sample.guidance.interval=[5, 1]"])


def test_a_bad_study_value_is_one_line(tmp_path):
    """The same explanation serves ablation study files (mapping keys, int | mapping unions, broken YAML)."""
    from diffit_cli.ablation.study import StudyError, load_study

    head = "name: x\ntitle: t\nsource: s\nbase: demo\nvariants:\n  - name: ok\n"
    for extra, named in (
        ("budgets:\n  huge: []\n", ["budgets: key 'huge'", "choose test, tiny, small or paper"]),
        ("curve_points: abc\n", ["curve_points = 'abc'", "an integer or a mapping"]),
        ("kind: nope\n", ["kind = 'nope'", "choose train, sample, curve or attention"]),
        ("title: [\n", ["study.yaml:", "not valid YAML"]),
    ):
        path = tmp_path / "study.yaml"
        path.write_text(head + extra)
        with pytest.raises(StudyError) as e:
            load_study(path)
        message = str(e.value)
        assert "\n" not in message and all(w in message for w in named), message
