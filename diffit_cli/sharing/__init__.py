"""Sharing a trained model the way the field does (docs/sharing.md): a self-describing folder of safetensors weights,
the preset, a `config.json`, a sample grid and a model card.

- `folder`: the folder's layout and reading it back (`read_model_folder`, used by `checkpoint.read_snapshot`);
- `card`: the model card (`README.md` with the Hub's YAML front matter);
- `export`: `export_model`, a checkpoint → the folder, written as a whole or not at all;
- `hub`: a Hub repository holding such a folder (`download_model`, `push_folder`) through `huggingface_hub`.

The package's `__init__` imports nothing: `checkpoint` reads folders through `folder`, and `export` reads checkpoints.
"""
