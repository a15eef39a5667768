#!/usr/bin/env bash
# Every check in one command: set up, format, lint, types, tests (real model included). CI runs this.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --dev
echo "== ruff format" >&2
.venv/bin/ruff format --check .
echo "== ruff check" >&2
.venv/bin/ruff check .
echo "== mypy --strict" >&2
.venv/bin/mypy
echo "== pytest" >&2
.venv/bin/python -m pytest "$@"
