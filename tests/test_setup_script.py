"""scripts/build_progress.py: the few lines a user sees while setup.sh compiles llama-cpp-python.

The input is recorded from a real `pip wheel -v` of llama-cpp-python 0.3.36 (paths shortened, flags
cut); the clock is passed in, so nothing here waits or measures time.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "build_progress.py"
SRC = "/home/u/.cache/peerinfer/wheels/llama-cpp-python-0.3.36-f31993ca89e6f50f.partial/src/llama_cpp_python-0.3.36"
FLAGS = "-DGGML_BUILD -DGGML_SHARED -O3 -DNDEBUG -fPIC -MD -MT x.o -MF x.o.d"

RECORDED = f"""\
Processing {SRC}
  Installing build dependencies: started
  *** scikit-build-core 1.1.2 using CMake 3.25.1 (wheel)
  *** Configuring CMake...
  -- The C compiler identification is GNU 12.2.0
  -- Configuring done
  -- Generating done
  *** Building project with Ninja...
  [1/193] /usr/bin/g++ {FLAGS} -o ggml.cpp.o -c {SRC}/vendor/llama.cpp/ggml/src/ggml.cpp
  [2/193] /usr/bin/gcc {FLAGS} -o ggml.c.o -c {SRC}/vendor/llama.cpp/ggml/src/ggml.c
  [12/193] : && /usr/bin/g++ -fPIC -O3 -shared -Wl,-soname,libggml-base.so.0 -o bin/libggml-base.so.0.25.3 a.o b.o && :
  [13/193] /usr/bin/cmake -E cmake_symlink_library bin/libggml-base.so.0.25.3 bin/libggml-base.so && :
  [40/193] /usr/bin/g++ {FLAGS} -o x.o -c {SRC}/vendor/llama.cpp/ggml/src/ggml-cpu/ggml-cpu.cpp
  [41/193] /usr/bin/g++ {FLAGS} -o x.o -c /tmp/b/vendor/llama.cpp/src/CMakeFiles/llama.dir/Unity/unity_0_cxx.cxx
  [97/193] /usr/bin/g++ {FLAGS} -o x.o -c {SRC}/vendor/llama.cpp/src/llama-model.cpp
  [193/193] : && /usr/bin/g++ -fPIC -O3 -shared -o vendor/llama.cpp/tools/mtmd/libmtmd.so m.o && :
  *** Installing project into wheel...
  -- Installing: /tmp/tmpq/wheel/platlib/llama_cpp/lib/libllama.so
  *** Making wheel...
  *** Created llama_cpp_python-0.3.36-py3-none-linux_x86_64.whl
"""


@pytest.fixture(scope="module")
def progress_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("build_progress", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def replay(module: ModuleType, text: str, seconds_per_line: float, every: float = 20.0) -> list[str]:
    progress = module.ProgressLines(start=0.0, every=every)
    printed = []
    for index, line in enumerate(text.splitlines()):
        shown = progress.feed(line, (index + 1) * seconds_per_line)
        if shown is not None:
            printed.append(shown)
    return printed


def test_a_slow_build_prints_each_step_with_percent_elapsed_and_the_file(progress_module: ModuleType) -> None:
    printed = replay(progress_module, RECORDED, seconds_per_line=30.0)
    assert "setup: [  0%] 4m30s  ggml/src/ggml.cpp" in printed
    assert "setup: [ 20%] 6m30s  ggml/src/ggml-cpu/ggml-cpu.cpp" in printed
    assert "setup: [ 50%] 7m30s  src/llama-model.cpp" in printed
    assert "setup: [100%] 8m00s  linking libmtmd.so" in printed
    assert "setup: [100%] 10m00s  wheel written" in printed
    assert all(line.startswith("setup: [") for line in printed)


def test_what_is_named_is_the_source_inside_llama_cpp_not_the_compiler_command(progress_module: ModuleType) -> None:
    printed = replay(progress_module, RECORDED, seconds_per_line=30.0)
    assert not any("/usr/bin" in line or " -D" in line or "CMakeFiles" in line for line in printed)
    assert "setup: [  6%] 5m30s  linking libggml-base.so.0.25.3" in printed
    assert not any("symlink" in line for line in printed)
    assert "setup: [ 21%] 7m00s  src/Unity/unity_0_cxx.cxx" in printed


def test_a_fast_stream_of_steps_is_thinned_to_one_line_per_interval(progress_module: ModuleType) -> None:
    steps = "".join(
        f"  [{n}/400] /usr/bin/gcc -o x.o -c {SRC}/vendor/llama.cpp/ggml/src/f{n}.c\n" for n in range(1, 401)
    )
    printed = replay(progress_module, steps, seconds_per_line=0.5, every=20.0)
    # 400 compiler calls over 200 s: the first step, then one line per 20 s.
    assert 8 <= len(printed) <= 12
    assert printed[0] == "setup: [  0%] 0s  ggml/src/f1.c"
    percents = [int(line.split("[")[1].split("%")[0]) for line in printed]
    assert percents == sorted(percents)
    assert not any("\r" in line for line in printed)


def test_a_silent_long_step_still_gets_a_line_now_and_then(progress_module: ModuleType) -> None:
    progress = progress_module.ProgressLines(start=0.0, every=20.0)
    first = progress.feed(f"  [97/193] /usr/bin/g++ -o x.o -c {SRC}/vendor/llama.cpp/src/llama-model.cpp", 10.0)
    assert first == "setup: [ 50%] 10s  src/llama-model.cpp"
    assert progress.tick(40.0) is None
    assert progress.tick(69.0) is None
    assert progress.tick(71.0) == "setup: [ 50%] 1m11s  src/llama-model.cpp"
    assert progress.tick(100.0) is None


def test_makes_percent_lines_are_read_too(progress_module: ModuleType) -> None:
    progress = progress_module.ProgressLines(start=0.0)
    line = progress.feed("[ 42%] Building C object vendor/llama.cpp/ggml/src/CMakeFiles/ggml-base.dir/ggml.c.o", 190.0)
    assert line == "setup: [ 42%] 3m10s  ggml/src/ggml.c"


@pytest.mark.parametrize(
    "line",
    [
        "[5/0] x",
        "[99999999999999999999/3] -c a.c",
        "[%] x",
        "\x00\x1b[31m[3/4]",
        "[1/2] " + "-c " * 100_000,
        "[1/2] -c " + "a/" * 100_000,
    ],
)
def test_odd_lines_do_not_stop_the_filter(progress_module: ModuleType, line: str) -> None:
    progress = progress_module.ProgressLines(start=0.0)
    shown = progress.feed(line, 1.0)
    assert shown is None or (shown.startswith("setup: [") and len(shown) < 400)


def test_the_filter_keeps_every_byte_in_the_log_and_prints_progress(tmp_path: Path) -> None:
    log = tmp_path / "build.log"
    log.write_bytes(b"an earlier, interrupted run\n")
    data = RECORDED.encode() + b"\xff\xfe not utf-8\n" + b"no newline at the end"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--log", str(log)], input=data, capture_output=True, check=False, timeout=60
    )
    assert result.returncode == 0
    assert log.read_bytes() == b"an earlier, interrupted run\n" + data
    assert result.stdout == b""
    printed = result.stderr.decode().splitlines()
    assert printed[0].startswith("setup: [    ] ")
    assert any(line.endswith("  ggml/src/ggml.cpp") for line in printed)
    assert len(printed) < 5
