#!/usr/bin/env bash
# Sets up the virtualenv that `colony bench route` runs its peers from (.cache/ann-venv,
# ignored by git): hnswlib (built from source by pip: a C++ compiler) and faiss-cpu from PyPI.
# Only the benchmark needs it, never the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.cache/ann-venv
py="$venv/bin/python"
if [ -x "$py" ] && "$py" -c 'import hnswlib, faiss, numpy' 2>/dev/null; then
    exit 0
fi
rm -rf "$venv"
if ! command -v g++ >/dev/null; then
    apt-get install -y --no-install-recommends g++ >/dev/null
fi
mkdir -p .cache
python3 -m venv "$venv"
"$venv/bin/pip" install --progress-bar off --no-cache-dir \
    'numpy==2.4.6' 'pybind11==2.13.6' 'setuptools' 'wheel'
"$venv/bin/pip" install --progress-bar off --no-cache-dir --no-build-isolation \
    'hnswlib==0.8.0' 'faiss-cpu==1.15.1'
"$py" -c 'import hnswlib, faiss; print("hnswlib", hnswlib.__version__ if hasattr(hnswlib, "__version__") else "0.8.0", "faiss", faiss.__version__)'
