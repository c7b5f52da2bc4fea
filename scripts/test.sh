#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
.venv/bin/python -m mypy          # src/fedseed, as configured in pyproject.toml: must be clean
exec .venv/bin/python -m pytest -q "$@"
