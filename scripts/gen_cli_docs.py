"""Write docs/commands.md, the reference of every `diffit` command and flag, from the command-line app itself.

The page is generated so that it cannot drift from the code: `tests/test_docs.py` checks that the file equals
this script's output. Run it after changing a command, a flag or a help text:

    .venv/bin/python scripts/gen_cli_docs.py           # rewrite docs/commands.md
    .venv/bin/python scripts/gen_cli_docs.py --check   # exit 1 if docs/commands.md is out of date

It walks `diffit_cli.app.build_app()` through Typer's click layer (`typer.main.get_command`): each command's help
text, arguments and options (flags, type or choices, default, help). The usage examples below are the only
hand-written part; the tests parse every one of them against the same app.
"""

from __future__ import annotations

import argparse
import inspect
import re
import sys
from enum import Enum
from pathlib import Path

import typer

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "commands.md"

# A few typical command lines per command (comments after `#`); every one is parsed by tests/test_docs.py.
EXAMPLES: dict[str, list[str]] = {
    "train": [
        "diffit train --preset demo                              # built-in synthetic shapes, CPU, minutes",
        "diffit train --preset cifar10                           # CIFAR-10 through torchvision, downloaded once",
        "diffit train --preset ffhq64 --data /data/ffhq-64x64.zip",
        "diffit train --preset cifar10 --set train.lr=2e-4 --set model.dropout=0.1",
        "diffit train --preset cifar10 --dry-run                 # resolved preset and parameter count",
        "diffit train --preset demo --kimg 96                    # extend a finished run (it resumes)",
        "diffit train --preset cifar10 --log-with tensorboard --log-with wandb",
        "accelerate launch --multi_gpu --num_processes 8 -m diffit_cli train --preset cifar10",
    ],
    "sample": [
        "diffit sample --ckpt runs/demo/checkpoints/latest.pt --out samples/ --grid grid.png   # seeds 0-63",
        "diffit sample --ckpt runs/cifar10/checkpoints/latest.pt --seeds 0-49999 --out cifar.npz",
        "diffit sample --ckpt runs/demo/checkpoints/latest.pt --sampler dpmpp-2m --steps 25 --classes 3 --out threes/",
        "diffit sample --ckpt nvidia/DiffiT:FILE.safetensors --preset imagenet256 --seeds 0-49999 --out in256.npz \\\n"
        "    --precision bf16",
    ],
    "eval-fid": [
        "diffit eval-fid samples/ --preset demo                  # against the preset's training set (cached)",
        "diffit eval-fid cifar.npz --ref cifar10-32x32.npz       # EDM's reference statistics",
        "diffit eval-fid in256.npz --ref VIRTUAL_imagenet256_labeled.npz --metrics fid,is,pr",
        "diffit eval-fid /data/ffhq-64x64.zip --save-ref ffhq64-stats.npz   # statistics of a dataset, for later",
        "diffit eval-fid --ckpt runs/cifar10/checkpoints/latest.pt --repeats 3 --ref cifar10-32x32.npz --json fid.json",
    ],
    "encode-latents": [
        "diffit encode-latents /data/imagenet/train /data/latents/in256 --resolution 256",
        "diffit encode-latents /data/imagenet/train /data/latents/in512 --resolution 512 --precision bf16",
        "accelerate launch --multi_gpu -m diffit_cli encode-latents /data/imagenet/train /data/latents/in256",
    ],
    "ablate": [
        "diffit ablate --list",
        "diffit ablate window-size --dry-run                     # the variants and how they differ",
        "diffit ablate window-size                               # tiny budget: CPU, minutes",
        "diffit ablate time-in-attention --only tmsa --only mlp",
        "diffit ablate window-size --budget paper --inception-weights weights.pth",
    ],
    "plot": [
        "diffit plot runs/demo                                   # writes curves.png",
        "diffit plot runs/ablations/window-size/tiny/w2 runs/ablations/window-size/tiny/w4 --out cmp.png",
    ],
    "ema": [
        "diffit ema runs/cifar10 --sigma-rel 0.05,0.075,0.10     # checkpoints in runs/cifar10/ema-reconstructed/",
        "diffit ema runs/cifar10 --sigma-rel 0.03,0.05,0.07,0.09,0.12 --sweep --num-samples 10000   # FID vs σ_rel",
        "diffit ema runs/cifar10 --sigma-rel 0.08 --at-kimg 100000 --out ema-100M/   # at an earlier stored time",
    ],
}


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _value(v: object) -> str:
    if isinstance(v, Enum):
        v = v.value
    if isinstance(v, (list, tuple)):
        return ", ".join(_value(x) for x in v)
    return str(v)


def _type(p) -> str:
    """A reader's name for a parameter's type: choices, a range, or the plain type."""
    d = p.type_descriptor
    if d.is_choice:
        kind = " \\| ".join(f"`{_value(c)}`" for c in d.choices)
    elif getattr(p, "is_flag", False):
        return "flag"
    elif d.is_ranged:
        base = d.ranged_type_name
        bounds = [f"≥ {p.min}" if p.min is not None else "", f"≤ {p.max}" if p.max is not None else ""]
        kind = f"{base} {' '.join(b for b in bounds if b)}".strip()
    else:
        kind = p.display_type(None).strip("<>")
        kind = {"str": "text", "list[str]": "text", "list[Path]": "path", "Path": "path"}.get(kind, kind)
    if getattr(p, "multiple", False):
        kind += ", repeatable"
    if p.nargs == -1:
        kind += ", one or more"
    return kind


def _default(p) -> str:
    if p.required:
        return "required"
    if getattr(p, "is_flag", False) and not p.secondary_opts:
        return "off" if not p.default else "on"
    if p.default is None or p.default == () or p.default == []:
        return "–"
    return f"`{_value(p.default)}`"


def _flags(p) -> str:
    if isinstance(p, typer.core.TyperArgument):
        return f"`{p.name.upper()}`"
    names = sorted(p.opts, key=lambda o: (not o.startswith("--"), o))
    text = ", ".join(f"`{o}`" for o in names)
    if p.secondary_opts:
        text += " / " + ", ".join(f"`{o}`" for o in p.secondary_opts)
    return text


def _usage(name: str, cmd) -> str:
    pieces = [f"diffit {name}", "[OPTIONS]"]
    for p in cmd.params:
        if isinstance(p, typer.core.TyperArgument):
            arg = p.name.upper() + (" ..." if p.nargs == -1 else "")
            pieces.append(arg if p.required else f"[{arg}]")
    return " ".join(pieces)


def _table(params) -> list[str]:
    rows = ["| Argument or option | Type | Default | Description |", "|---|---|---|---|"]
    for p in params:
        if getattr(p, "hidden", False):
            continue
        rows.append(f"| {_flags(p)} | {_type(p)} | {_default(p)} | {_cell(p.help or '')} |")
    return rows


def render() -> str:
    """The whole page, as a string (deterministic: no terminal width, no dates)."""
    from diffit_cli.app import build_app

    root = typer.main.get_command(build_app())
    out = [
        "# Command reference",
        "",
        "<!-- Generated by scripts/gen_cli_docs.py from the command-line app; do not edit by hand. -->",
        "",
        "This page is generated from the `diffit` app itself by `scripts/gen_cli_docs.py` (the tests check that it is",
        "up to date), so every command, argument, option, type and default below is what the program accepts.",
        "The same text is printed by `diffit --help` and by each command's `--help` (`-h` works too), e.g.",
        "`diffit train --help`.",
        "",
        "Every command prints one readable line and exits with code 2 on bad input; `--debug` before the command",
        "(`diffit --debug train --preset demo`) shows the full traceback instead. `python -m diffit_cli` is the same",
        "app, so multi-process runs start as `accelerate launch -m diffit_cli train ...` (see",
        "[clusters.md](clusters.md)). Exit codes and what to do after a failure: [recovery.md](recovery.md).",
        "",
        "## `diffit`",
        "",
        "```text",
        "diffit [--version] [--debug] COMMAND [ARGS]",
        "```",
        "",
        inspect.cleandoc(root.help or ""),
        "",
        *_table(root.params),
        "",
        "| Command | What it does |",
        "|---|---|",
    ]
    for name, cmd in root.commands.items():
        if not cmd.hidden:
            summary = re.split(r"(?<=\.)\s+(?=[A-Z])", " ".join(inspect.cleandoc(cmd.help or "").split()))[0]
            out.append(f"| [`{name}`](#diffit-{name}) | {_cell(summary)} |")
    for name, cmd in root.commands.items():
        if cmd.hidden:
            continue
        out += [
            "",
            f"## `diffit {name}`",
            "",
            "```text",
            _usage(name, cmd),
            "",
            inspect.cleandoc(cmd.help or ""),
            "```",
        ]
        out += ["", *_table(cmd.params)]
        if name in EXAMPLES:
            out += ["", "Examples:", "", "```bash", *EXAMPLES[name], "```"]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if docs/commands.md differs from the output")
    ap.add_argument("--out", type=Path, default=PAGE, help="where to write the page (default docs/commands.md)")
    args = ap.parse_args(argv)
    text = render()
    if args.check:
        if not args.out.exists() or args.out.read_text() != text:
            print(f"{args.out} is out of date: run python scripts/gen_cli_docs.py", file=sys.stderr)
            return 1
        return 0
    args.out.write_text(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
