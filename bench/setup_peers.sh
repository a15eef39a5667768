#!/usr/bin/env bash
# The peers the serving benchmark compares against, built outside the repo:
# - a venv with llama-cpp-python[server] (python -m llama_cpp.server), from the same portable wheel;
# - llama.cpp's C++ llama-server, built with -DGGML_NATIVE=OFF (about 11 minutes, once).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --dev
cache="${PEERINFER_BENCH_CACHE:-$HOME/.cache/peerinfer/bench}"
version=$(sed -n 's/^llama-cpp-python==\([^ ;]*\).*/\1/p' requirements.txt)
if [ ! -x "$cache/venv/bin/python" ]; then
  python3 -m venv "$cache/venv"
fi
wheel=$(ls "${PEERINFER_WHEEL_CACHE:-$HOME/.cache/peerinfer/wheels}"/llama-cpp-python-"$version"-*/llama_cpp_python-*.whl | head -n 1)
"$cache/venv/bin/python" -m pip install -q "$wheel" "llama-cpp-python[server]==$version"
bash bench/build_llama_server.sh >/dev/null
