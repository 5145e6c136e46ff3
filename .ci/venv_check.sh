#!/usr/bin/env bash
# The README's set-up in a fresh virtual environment: install the project as a new user does, then run the
# installed command (its version, and the demo's plan). System packages come from .ci/install.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="$(mktemp -d)/venv"
trap 'rm -rf "$(dirname "$venv")"' EXIT
python3 -m venv "$venv"
"$venv/bin/pip" install -q --disable-pip-version-check -e '.[tensorboard]'
"$venv/bin/extrema-launch" --version
"$venv/bin/extrema-launch" sweep jobs/demo.yaml --dry-run --root "$(dirname "$venv")/runs" >/dev/null
echo "venv install: ok"
