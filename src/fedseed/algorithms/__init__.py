"""The federated methods, each behind :class:`~fedseed.algorithms.base.Algorithm`.

``[algorithm]`` in a config is ``name`` plus the fields of that method's config
dataclass; :mod:`fedseed.algorithms.registry` is the only place a name becomes an
object. The names below load on first use, so ``fedseed.algorithms.robust`` (what
the config reads) imports no torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "EVALUATOR": "base", "Algorithm": "base", "Batches": "base", "InvalidReply": "base",
    "METHODS": "registry", "algorithm_config": "registry", "build_algorithm": "registry",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
