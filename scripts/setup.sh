#!/usr/bin/env bash
# Create .venv and install everything peerinfer needs. Safe to run again; fast when nothing changed.
#
# llama-cpp-python ships only as source. Its default build compiles for the build machine's CPU and
# can crash with SIGILL elsewhere (AMX on some VMs), and pip reuses a wheel it built earlier whatever
# CMAKE_ARGS says. So we build one portable wheel ourselves, keyed by version + flags + platform,
# cache it outside the repo, and install exactly that file.
set -euo pipefail
cd "$(dirname "$0")/.."

want_dev=0
[ "${1:-}" = "--dev" ] && want_dev=1

python_bin="${PYTHON:-}"
if [ -z "$python_bin" ]; then
  for candidate in python3.11 python3.12 python3; do
    if command -v "$candidate" >/dev/null 2>&1; then python_bin="$candidate"; break; fi
  done
fi
[ -n "$python_bin" ] || { echo "setup: no python3 found; install Python 3.11+" >&2; exit 1; }

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $python_bin" >&2
  "$python_bin" -m venv .venv
fi
pip=(.venv/bin/python -m pip --disable-pip-version-check -q)

llama_version=$(sed -n 's/^llama-cpp-python==\([^ ;]*\).*/\1/p' requirements.txt)
cmake_args="${PEERINFER_CMAKE_ARGS:--DGGML_NATIVE=OFF}"
platform=$(.venv/bin/python -c 'import sys, sysconfig; print(sysconfig.get_platform(), sys.version_info[:2])')
key=$(printf '%s|%s|%s' "$llama_version" "$cmake_args" "$platform" | sha256sum | cut -c1-16)
wheel_dir="${PEERINFER_WHEEL_CACHE:-$HOME/.cache/peerinfer/wheels}/llama-cpp-python-$llama_version-$key"

if ! ls "$wheel_dir"/llama_cpp_python-*.whl >/dev/null 2>&1; then
  echo "setup: building llama-cpp-python $llama_version with CMAKE_ARGS='$cmake_args' (about 12 minutes, once)" >&2
  mkdir -p "$wheel_dir"
  CMAKE_ARGS="$cmake_args" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
    "${pip[@]}" wheel --no-deps --no-cache-dir "llama-cpp-python==$llama_version" -w "$wheel_dir.tmp"
  mv "$wheel_dir".tmp/llama_cpp_python-*.whl "$wheel_dir"/ && rmdir "$wheel_dir.tmp"
fi
marker=.venv/.llama-cpp-python-build
if [ "$(cat "$marker" 2>/dev/null)" != "$key" ]; then
  "${pip[@]}" install --force-reinstall --no-deps "$wheel_dir"/llama_cpp_python-*.whl
  echo "$key" > "$marker"
fi

"${pip[@]}" install -r requirements.txt

# peerinfer's output head (peerinfer/engine/output_head.c, one C file): rebuilt when the source is newer.
# Without it the worker runs, with llama.cpp's slower output product (the log says which one it uses).
head_source=peerinfer/engine/output_head.c
head_library=peerinfer/engine/_output_head.so
if [ ! -f "$head_library" ] || [ "$head_source" -nt "$head_library" ]; then
  compiler="${CC:-cc}"
  if "$compiler" -O3 -ffp-contract=off -fPIC -shared -fopenmp "$head_source" -o "$head_library.tmp"; then
    mv "$head_library.tmp" "$head_library"
  else
    rm -f "$head_library.tmp"
    echo "setup: could not build $head_library with $compiler; the worker will use llama.cpp's output product" >&2
  fi
fi
if [ "$want_dev" = 1 ]; then
  "${pip[@]}" install -r requirements-dev.txt
fi
