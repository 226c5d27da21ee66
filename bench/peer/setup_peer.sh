#!/usr/bin/env bash
# Create bench/peer/.venv with lucidrains' CALM-pytorch (the peer) on the same torch as ours.
# Versions are pinned in bench/peer/requirements-peer.txt (what `pip install torch==2.13.0
# calm-pytorch` resolved to on the reference run); pass --unpinned to re-resolve.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
py="${PYTHON:-python3.11}"
if [ ! -x "$here/.venv/bin/python" ]; then
  "$py" -m venv "$here/.venv"
fi
if [ "${1:-}" = "--unpinned" ]; then
  "$here/.venv/bin/pip" install -q torch==2.13.0 calm-pytorch psutil
  "$here/.venv/bin/pip" freeze > "$here/requirements-peer.txt"
else
  "$here/.venv/bin/pip" install -q -r "$here/requirements-peer.txt"
fi
"$here/.venv/bin/python" -c "import CALM_pytorch, x_transformers, torch; print('peer venv ok: torch', torch.__version__)"
