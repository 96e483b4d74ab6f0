"""Presets (docs/architecture.md, 'Pipeline'): the complete recipe of a run, validated by a pydantic schema.

- `sections`: the paper's sections (model kinds `unet`/`vit`, EDM/DDPM, data, train, sample, eval);
- `baselines`: the ablation-only kinds (Table 4 encoder/decoders, Table 5 DDPM++, EDM VP/VE);
- `schema`: `Preset` and the checks across sections;
- `io`: load by name or path, `--set` overrides, dump, differences;
- `explain`: a bad value or a broken YAML file as one line (the key or flag, the value, what it accepts).
"""

from diffit_cli.config.baselines import DDPMppConfig, EDMVEConfig, EDMVPConfig, EncDecConfig
from diffit_cli.config.io import (
    PresetError,
    apply_overrides,
    available_presets,
    check_sample_values,
    diff_presets,
    dump_preset,
    load_preset,
    parse_overrides,
    preset_dir,
    preset_from_yaml,
    preset_to_dict,
    read_preset_file,
    set_values,
    validate_preset,
)
from diffit_cli.config.schema import DiffusionConfig, ModelConfig, Preset
from diffit_cli.config.sections import (
    DataConfig,
    DDPMConfig,
    EDMConfig,
    EvalConfig,
    GuidanceConfig,
    SampleConfig,
    TrainConfig,
    UNetConfig,
    ViTConfig,
)

__all__ = [
    "DDPMppConfig",
    "EDMVEConfig",
    "EDMVPConfig",
    "EncDecConfig",
    "PresetError",
    "apply_overrides",
    "available_presets",
    "check_sample_values",
    "diff_presets",
    "dump_preset",
    "load_preset",
    "parse_overrides",
    "preset_dir",
    "preset_from_yaml",
    "preset_to_dict",
    "read_preset_file",
    "set_values",
    "validate_preset",
    "DiffusionConfig",
    "ModelConfig",
    "Preset",
    "DataConfig",
    "DDPMConfig",
    "EDMConfig",
    "EvalConfig",
    "GuidanceConfig",
    "SampleConfig",
    "TrainConfig",
    "UNetConfig",
    "ViTConfig",
]
