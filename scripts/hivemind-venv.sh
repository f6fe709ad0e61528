#!/usr/bin/env bash
# Sets up the virtualenv that `colony bench allreduce --hivemind` runs hivemind 1.1.12 from
# (.cache/hivemind-venv, ignored by git). hivemind pulls torch from PyPI, with its CUDA
# libraries: about 3 GB to download once.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.cache/hivemind-venv
if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c 'import hivemind, torch' 2>/dev/null; then
    exit 0
fi
mkdir -p .cache
python3 -m venv "$venv"
"$venv/bin/pip" install --progress-bar off 'hivemind==1.1.12'
"$venv/bin/python" -c 'import hivemind; print("hivemind", hivemind.__version__)'
