#!/usr/bin/env bash
# Set up (idempotent) and run the quickstart federated run (configs/quickstart.toml).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
exec .venv/bin/fedseed run configs/quickstart.toml --overwrite "$@"
