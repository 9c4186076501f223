#!/usr/bin/env bash
# The whole test suite, as CI runs it: set up the host, build the test guest image, run every test.
# Usage: bash scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
QINST_TEST_IMAGE=$(bash tests/images/build.sh | tail -n 1)
export QINST_TEST_IMAGE
exec .venv/bin/pytest -m "" "$@"
