"""Registry of training methods: `--method NAME` -> the module that builds it.

Each module exposes
`build(cfg: TrainConfig, *, num_classes: int, make_net: Callable[[], Student], num_rows: int) -> Method`
(see `pipeline/training.py` for the Method protocol) and a module docstring that cites its paper and lists
its defaults.
"""

from __future__ import annotations

import importlib

from pipeline.errors import CoregError

METHODS: dict[str, str] = {
    "coreg": "pipeline.coreg.method",
    "ce": "pipeline.baselines.ce",
    "kd": "pipeline.baselines.kd",
    "proden": "pipeline.baselines.proden",
    "cc": "pipeline.baselines.cc",
    "cr_dpll": "pipeline.baselines.cr_dpll",
    "pico": "pipeline.baselines.pico",
    "alim": "pipeline.baselines.alim",
    "dividemix": "pipeline.baselines.dividemix",
}


def get_method_module(name: str):
    if name not in METHODS:
        raise CoregError(f"--method {name!r} is unknown; choose one of: {', '.join(METHODS)}")
    return importlib.import_module(METHODS[name])
