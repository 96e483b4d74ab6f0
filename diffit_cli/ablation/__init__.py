"""Ablation studies (DiffiT Tables 3–8, Figs. 2, 7, 8): `study` (schema and loading), `budget`, `plan`, `run`,
`attention`, `report`.

Importing this package stays light (no torch) so `diffit ablate --list` starts fast; planning and running
(`plan_study`, `run_study`, ...) load their machinery on first use.
"""

import importlib

from diffit_cli.ablation.budget import BUDGETS, PUBLIC_BUDGETS, Budget, apply_budget, get_budget
from diffit_cli.ablation.study import RESULT, Study, StudyError, Variant, available_studies, load_study

_LAZY = {
    "run_study": "run",
    "choose_extractor": "run",
    "StudyResult": "run",
    "attention_maps": "attention",
    "plan_study": "plan",
    "resolve_preset": "plan",
    "resolve_guide_preset": "plan",
    "default_runs_dir": "plan",
    "StudyPlan": "plan",
    "VariantPlan": "plan",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"diffit_cli.ablation.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'diffit_cli.ablation' has no attribute {name!r}")


__all__ = [
    "BUDGETS",
    "PUBLIC_BUDGETS",
    "Budget",
    "apply_budget",
    "get_budget",
    "StudyPlan",
    "VariantPlan",
    "default_runs_dir",
    "plan_study",
    "resolve_preset",
    "resolve_guide_preset",
    "RESULT",
    "Study",
    "StudyError",
    "Variant",
    "available_studies",
    "load_study",
    "run_study",
    "choose_extractor",
    "StudyResult",
    "attention_maps",
]
