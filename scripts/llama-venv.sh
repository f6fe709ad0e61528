#!/usr/bin/env bash
# Sets up the virtualenv that `colony bench infer --llama-cpp` runs llama.cpp from
# (.cache/llama-venv, ignored by git): llama-cpp-python from PyPI, built from source here
# (cmake and a C++ compiler; about fifteen minutes on two cores). Only the benchmark needs
# it, never the tests. The default build (GGML_NATIVE) died with SIGILL on the development
# machine, a virtual Xeon whose cpuinfo lists AMX and AVX-512: the instruction sets are named
# here instead (AVX2, FMA, F16C, AVX-512; no AMX).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.cache/llama-venv
py="$venv/bin/python"
flags="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON"
if [ -x "$py" ] && "$py" -c 'import llama_cpp' 2>/dev/null \
    && [ "$(cat "$venv/.cmake-args" 2>/dev/null)" = "$flags" ]; then
    exit 0
fi
rm -rf "$venv"
if ! command -v cmake >/dev/null || ! command -v g++ >/dev/null; then
    apt-get install -y --no-install-recommends cmake g++ >/dev/null
fi
mkdir -p .cache
python3 -m venv "$venv"
CMAKE_ARGS="$flags" \
CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" "$venv/bin/pip" install --progress-bar off --no-cache-dir \
    'llama-cpp-python==0.3.36' 'numpy==2.4.6'
"$py" -c 'import llama_cpp; print("llama-cpp-python", llama_cpp.__version__)'
echo "$flags" > "$venv/.cmake-args"
