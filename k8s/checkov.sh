#!/usr/bin/env bash
# Policy scan of every manifest under k8s/ (rendered ones included) with checkov.
# checkov's dependency pins clash with trackb's (pip backtracks to a 2021 checkov in
# .venv), so it lives in its own venv under .cache/, installed on first use.
#   usage: k8s/checkov.sh [extra checkov args]
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="${CHECKOV_VENV:-$root/.cache/checkov-venv}"
version="${CHECKOV_VERSION:-3.3.30}"
if [ ! -x "$venv/bin/checkov" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet "checkov==$version"
fi
# --quiet: list failures only. Suppressions are annotations with a written reason
# (checkov.io/skipN on each Job), added by trackb_core/k8s/jobspec.py.
exec "$venv/bin/checkov" --directory "$root/k8s" --framework kubernetes secrets \
  --compact --quiet "$@"
