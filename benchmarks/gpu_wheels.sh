#!/usr/bin/env bash
# The Python packages diffit needs that the lent GPU machine's image lacks (it has torch, accelerate, typer, rich,
# matplotlib, torchvision, safetensors, PyYAML, pillow; not pydantic, torch-fidelity or diffusers), downloaded here
# as wheels into .whl/ (git-ignored) for the device call to carry: that machine cannot reach a registry. The
# versions are this venv's. Run it here, where pip works:
#   bash benchmarks/gpu_wheels.sh            # then see benchmarks/gpu_acceptance.sh for the device command
set -euo pipefail
PY=${PY:-.venv/bin/python}
pins=$($PY -m pip list --format=freeze 2>/dev/null | grep -iE '^(pydantic|pydantic[_-]core|annotated[_-]types|typing[_-]inspection|typing[_-]extensions|torch[_-]fidelity|diffusers|importlib[_-]metadata)==')
rm -rf .whl
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl $pins
ls .whl
