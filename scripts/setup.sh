#!/usr/bin/env bash
# Create .venv and install autoprec with its test tools. Idempotent: a stamp holding the hash of
# pyproject.toml (and this script) makes a second run return in well under a second.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
stamp=.venv/.autoprec-setup
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && .venv/bin/python -c "import autoprec" 2>/dev/null; then
  exit 0
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip >/dev/null 2>&1 || true
# torch first, pinned: 2.13.0 is the CPU wheel these machines carry; an unpinned torch would pull
# a multi-GB CUDA build. (pyproject admits <=2.14.1, so this choice is kept by the next step.)
.venv/bin/python -m pip install -q --disable-pip-version-check "torch==2.13.0"
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test]"
echo "$want" > "$stamp"
