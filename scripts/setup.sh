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
# peerinfer's own changes to the llama.cpp it vendors (see the top of each file); a change rebuilds.
patches=(scripts/llama-cpp-patches/*.patch)
patches_sum=$(cat "${patches[@]}" | sha256sum | cut -c1-16)
key=$(printf '%s|%s|%s|%s' "$llama_version" "$cmake_args" "$platform" "$patches_sum" | sha256sum | cut -c1-16)
wheel_cache="${PEERINFER_WHEEL_CACHE:-$HOME/.cache/peerinfer/wheels}"
wheel_dir="$wheel_cache/llama-cpp-python-$llama_version-$key"
# An interrupted build leaves $work_dir (source, cmake's build tree, log); the next run resumes there.
# $wheel_dir only ever receives a finished wheel, by rename, so a wheel found there is a whole one.
work_dir="$wheel_dir.partial"
# Wall time of a cold build on this project's 2-core VMs, measured; the estimate scales it by nproc.
build_seconds_on_2_cores=400

have_wheel() { ls "$wheel_dir"/llama_cpp_python-*.whl >/dev/null 2>&1; }

build_wheel() {
  rm -rf "$wheel_dir.tmp" # left by an interrupted run of an older setup.sh
  local src="$work_dir/src/llama_cpp_python-$llama_version"
  local log="$work_dir/build.log"
  if [ -d "$work_dir/cmake" ] && [ -f "$src/pyproject.toml" ]; then
    echo "setup: resuming the interrupted build of llama-cpp-python $llama_version in $work_dir" \
      "(the percentages count the steps left)" >&2
  else
    local cores minutes measured
    cores=$(nproc)
    minutes=$(((build_seconds_on_2_cores * 2 / cores + 59) / 60))
    printf -v measured '%dm%02ds' $((build_seconds_on_2_cores / 60)) $((build_seconds_on_2_cores % 60))
    echo "setup: building llama-cpp-python $llama_version with CMAKE_ARGS='$cmake_args', once;" \
      "estimate: about $minutes minutes on $cores cores (it took $measured on 2)" >&2
  fi
  if [ ! -f "$src/pyproject.toml" ]; then
    rm -rf "$work_dir"
    mkdir -p "$work_dir/sdist" "$work_dir/src.tmp"
    "${pip[@]}" download --no-deps --no-binary :all: "llama-cpp-python==$llama_version" -d "$work_dir/sdist"
    tar -xzf "$work_dir"/sdist/llama_cpp_python-*.tar.gz -C "$work_dir/src.tmp"
    # git apply works outside a repository too, and refuses a patch that does not fit, whole. The
    # ceiling stops it from taking a repository around the cache (a home directory kept in git) as its own.
    for patch in "${patches[@]}"; do
      GIT_CEILING_DIRECTORIES="$work_dir" \
        git -C "$work_dir/src.tmp/llama_cpp_python-$llama_version/vendor/llama.cpp" apply -p1 "$PWD/$patch"
      echo "setup: applied $patch" >&2
    done
    mv "$work_dir/src.tmp" "$work_dir/src" # a rename: $src exists only once it is whole
    rm -rf "$work_dir/sdist"
  fi
  rm -rf "$work_dir/out"
  echo "setup: the whole build log is $log" >&2
  local started=$SECONDS interrupted=0
  # Ctrl-C reaches pip, cmake and the compilers too; bash waits for them to stop, then says so.
  trap 'interrupted=1' INT
  # A build from a fixed source directory into a fixed build-dir is what lets cmake and ninja pick up
  # where a killed build stopped (ninja redoes any step it had not logged as finished). The children
  # inherit the lock on purpose: a compiler that outlives a killed setup.sh still writes into $work_dir.
  if ! CMAKE_ARGS="$cmake_args" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
    .venv/bin/python -m pip --disable-pip-version-check wheel -v --no-deps --no-cache-dir \
    --config-settings=build-dir="$work_dir/cmake" "$src" -w "$work_dir/out" 2>&1 |
    .venv/bin/python scripts/build_progress.py --log "$log"; then
    if [ "$interrupted" = 1 ]; then
      echo "setup: interrupted; the next run resumes the build where it stopped" >&2
      exit 130
    fi
    echo "setup: building llama-cpp-python failed; the last 40 lines of $log (cut at 500 columns):" >&2
    tail -n 40 "$log" | cut -c1-500 >&2
    echo "setup: the next run resumes this build; remove $work_dir to start it from scratch" >&2
    exit 1
  fi
  trap - INT
  mkdir -p "$wheel_dir"
  mv "$work_dir"/out/llama_cpp_python-*.whl "$wheel_dir"/
  rm -rf "$work_dir"
  local took=$((SECONDS - started))
  printf 'setup: built llama-cpp-python in %dm%02ds; cached in %s\n' $((took / 60)) $((took % 60)) "$wheel_dir" >&2
}

if ! have_wheel; then
  mkdir -p "$wheel_cache"
  # Two setups sharing one cache (two checkouts, parallel CI jobs) must not build into one work_dir.
  exec 9>"$wheel_dir.lock"
  if ! flock -n 9; then
    echo "setup: another setup is building llama-cpp-python into $wheel_cache; waiting for it" >&2
    flock 9
  fi
  if ! have_wheel; then build_wheel; fi # not "have_wheel || build_wheel": bash ignores set -e inside a function called that way
  exec 9>&-
elif [ -d "$work_dir" ]; then
  rm -rf "$work_dir" # interrupted between the wheel's rename and the cleanup
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
  bash scripts/install_system.sh # Debian packages for the browser, namespace and NAT tests; never fails
  nfqueue_pin=$(sed -n 's/^netfilterqueue==\([^ ;]*\).*/\1/p' requirements-netfilterqueue.txt)
  if ! .venv/bin/python -c "import sys, netfilterqueue; sys.exit(netfilterqueue.__version__ != '$nfqueue_pin')" 2>/dev/null; then
    nfqueue_log="${TMPDIR:-/tmp}/peerinfer-netfilterqueue.log"
    if ! "${pip[@]}" install -r requirements-netfilterqueue.txt >"$nfqueue_log" 2>&1; then
      echo "setup: could not install netfilterqueue $nfqueue_pin (see $nfqueue_log; it needs" \
        "libnetfilter-queue-dev); the link shaper's tests will be skipped" >&2
    fi
  fi
fi
