#!/usr/bin/env bash
# Build llama.cpp's own C++ llama-server from the llama.cpp sources vendored in the pinned
# llama-cpp-python sdist, portably (-DGGML_NATIVE=OFF), and cache it outside the repo.
# Prints the binary's path. About 11 minutes on 2 cores, once. Also builds llama-quantize next to it
# (bench/make_timing_model.py uses it; a minute more once the libraries are built).
set -euo pipefail
cd "$(dirname "$0")/.."
version=$(sed -n 's/^llama-cpp-python==\([^ ;]*\).*/\1/p' requirements.txt)
cache="${PEERINFER_BENCH_CACHE:-$HOME/.cache/peerinfer/bench}/llama-server-$version"
binary="$cache/build/bin/llama-server"
if [ ! -x "$binary" ] || [ ! -x "$cache/build/bin/llama-quantize" ]; then
  mkdir -p "$cache"
  if [ ! -d "$cache/src" ]; then
    .venv/bin/python -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$version" -d "$cache/sdist" >&2
    tar -xzf "$cache"/sdist/llama_cpp_python-*.tar.gz -C "$cache"
    mv "$cache"/llama_cpp_python-"$version"/vendor/llama.cpp "$cache/src"
    rm -rf "$cache"/llama_cpp_python-"$version" "$cache/sdist"
  fi
  cmake -S "$cache/src" -B "$cache/build" -DGGML_NATIVE=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DCMAKE_BUILD_TYPE=Release >&2
  cmake --build "$cache/build" --target llama-server llama-quantize -j "$(nproc)" >&2
fi
echo "$binary"
