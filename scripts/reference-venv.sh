#!/usr/bin/env bash
# Sets up the virtualenv that scripts/reference_logits.py runs from (.cache/ref-venv, ignored
# by git): PyTorch + Hugging Face transformers + gguf, an implementation independent of ours that
# reads the same GGUF file and produces the reference logits and token ids in
# inference/tests/fixtures/. Only needed to regenerate those fixtures, never by the tests.
# torch comes from PyPI with its CUDA libraries (about 3 GB to download once; it runs on CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.cache/ref-venv
py="$venv/bin/python"
if [ -x "$py" ] && "$py" -c 'import torch, transformers, gguf, numpy, jinja2, accelerate' 2>/dev/null; then
    exit 0
fi
mkdir -p .cache
python3 -m venv "$venv"
"$venv/bin/pip" install --progress-bar off \
    'torch==2.15.0' 'transformers==5.23.0' 'gguf==0.19.0' 'numpy==2.4.6' 'jinja2==3.1.6' \
    'accelerate==1.15.0'
"$py" -c 'import torch, transformers, gguf; print("torch", torch.__version__, "transformers", transformers.__version__)'
