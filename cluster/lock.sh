#!/usr/bin/env bash
# Re-resolve the project's dependencies in a fresh virtual environment and write cluster/requirements.lock:
# the exact versions the README's commands (and CI) then install. Run from the project root.
set -euo pipefail
cd "$(dirname "$0")/.."
env=$(mktemp -d)
trap 'rm -rf "$env"' EXIT
python3 -m venv "$env"
"$env/bin/pip" install -q -e ".[dev]"
{
    echo '# Every package version CI tested: python3 -m venv .venv && .venv/bin/pip install -c cluster/requirements.lock -e ".[dev]"'
    echo '# Refresh after changing pyproject.toml (one command, from the project root): bash cluster/lock.sh'
    "$env/bin/pip" freeze --exclude-editable
} > cluster/requirements.lock.tmp
mv cluster/requirements.lock.tmp cluster/requirements.lock
echo "cluster/requirements.lock: $(grep -c '==' cluster/requirements.lock) pinned packages"
