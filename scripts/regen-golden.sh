#!/usr/bin/env bash
# Regenerate the golden files of tests/golden/ after an intended change of a
# format or a report; review `git diff tests/golden` before committing.
set -euo pipefail
cd "$(dirname "$0")/.."
EWQ_REGEN_GOLDEN=1 .venv/bin/python -m pytest -q -p no:cacheprovider tests/test_golden.py
git --no-pager diff --stat -- tests/golden || true
