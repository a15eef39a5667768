"""Turn pip's verbose build of llama-cpp-python into a few progress lines; keep the whole output in a log.

Used by scripts/setup.sh as `pip wheel -v ... 2>&1 | python scripts/build_progress.py --log FILE`.
Every byte read on stdin goes to FILE. On stderr it prints plain lines (no carriage returns, so a CI
log reads like a terminal) such as

    setup: [ 42%] 3m10s  ggml/src/ggml-cpu/ggml-cpu.c

at most one every --every seconds while the build moves, and one every three times that while a
single long step (one big C++ file) is silent, so nobody takes the build for hung.

The percentage is ninja's `[done/total]` (scikit-build-core drives cmake with ninja; make's `[ 42%]`
is read too). llama-cpp-python sets cmake.verbose, so a ninja line is the whole compiler command: the
file after `-c` is what is being compiled, the file after `-o` what is being linked. After a resumed
build, ninja counts only the steps that are left, so the percentage is of what remains.

Pure standard library: it runs before anything else is installed.
"""

from __future__ import annotations

import argparse
import os
import re
import select
import signal
import sys
import time

_NINJA_STEP = re.compile(r"^\[(\d+)/(\d+)\]\s+(.*)$")
_MAKE_STEP = re.compile(r"^\[\s*(\d+)%\]\s+(.*)$")
_COMPILED = re.compile(r"\s-c\s+(\S+)")
_OUTPUT = re.compile(r"\s-o\s+(\S+)")
_OBJECT = re.compile(r"^Building \S+ object (\S+)$")
_LINKED = re.compile(r"^Linking \S+ (?:shared |static |module )?(?:library|executable) (\S+)$")
_SOURCE_ROOT = "vendor/llama.cpp/"
_WIDEST = 80


def short_path(path: str) -> str:
    """`.../vendor/llama.cpp/ggml/src/ggml.c` -> `ggml/src/ggml.c`; a path outside llama.cpp keeps its tail."""
    path = re.sub(r"CMakeFiles/[^/]+\.dir/", "", path)
    index = path.rfind(_SOURCE_ROOT)
    if index >= 0:
        return path[index + len(_SOURCE_ROOT) :]
    parts = path.split("/")
    return "/".join(parts[-3:])


def describe(command: str) -> str | None:
    """What one build step works on, in a few words; None for a step not worth naming (a symlink)."""
    compiled = _COMPILED.search(command)
    if compiled:
        return short_path(compiled.group(1))
    obj = _OBJECT.match(command)
    if obj:
        return short_path(obj.group(1).removesuffix(".o"))
    linked = _LINKED.match(command)
    if linked:
        return "linking " + linked.group(1).rsplit("/", 1)[-1]
    output = _OUTPUT.search(command)
    if output:
        return "linking " + output.group(1).rsplit("/", 1)[-1]
    return None


# scikit-build-core's and cmake's own milestones, as the user should read them.
_PHASES = (
    ("*** Configuring CMake", "configuring with cmake"),
    ("*** Building project", "compiling"),
    ("*** Installing project", "installing into the wheel"),
    ("*** Making wheel", "writing the wheel"),
    ("*** Created", "wheel written"),
)


def format_elapsed(seconds: float) -> str:
    """45s, 3m10s, 1h02m: short enough for a progress line."""
    whole = int(seconds)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole // 3600}h{whole % 3600 // 60:02d}m"


class ProgressLines:
    """Decides which progress lines to print; the clock is passed in, so it is tested without waiting.

    `feed(line, now)` takes one line of the build's output, `tick(now)` is called when output is
    silent; each returns the line to print, or None.
    """

    def __init__(self, start: float, every: float = 20.0, prefix: str = "setup: ") -> None:
        self._start = start
        self._every = every
        self._prefix = prefix
        self._percent: int | None = None
        self._what = "starting"
        self._last_printed: float | None = None
        self._changed = False
        self._shown_a_step = False

    def feed(self, line: str, now: float) -> str | None:
        line = line.strip()
        step = _NINJA_STEP.match(line)
        make = _MAKE_STEP.match(line) if step is None else None
        if step is not None:
            done, total = int(step.group(1)), int(step.group(2))
            self._update(min(100, done * 100 // total) if total > 0 else None, describe(step.group(3)))
        elif make is not None:
            self._update(min(100, int(make.group(1))), describe(make.group(2)))
        else:
            phase = next((name for start, name in _PHASES if line.startswith(start)), None)
            if phase is None:
                return self.tick(now)
            self._update(self._percent, phase)
        if self._percent is not None and not self._shown_a_step:
            self._shown_a_step = True  # the first compile step shows at once: the build has begun
            return self._line(now)
        return self.tick(now)

    def tick(self, now: float) -> str | None:
        if self._last_printed is None:
            return self._line(now) if self._changed else None
        quiet = now - self._last_printed
        if (self._changed and quiet >= self._every) or quiet >= 3 * self._every:
            return self._line(now)
        return None

    def _update(self, percent: int | None, what: str | None) -> None:
        what = self._what if what is None else what
        if len(what) > _WIDEST:
            what = "..." + what[3 - _WIDEST :]
        if (percent, what) != (self._percent, self._what):
            self._percent, self._what = percent, what
            self._changed = True

    def _line(self, now: float) -> str:
        self._last_printed = now
        self._changed = False
        percent = "[    ]" if self._percent is None else f"[{self._percent:3d}%]"
        return f"{self._prefix}{percent} {format_elapsed(now - self._start)}  {self._what}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--log", required=True, help="file that receives the build's whole output")
    parser.add_argument("--every", type=float, default=20.0, help="seconds between progress lines")
    args = parser.parse_args(argv)
    # Ctrl-C reaches the whole process group; keep reading so the log holds the build's last words.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    progress = ProgressLines(time.monotonic(), every=args.every)
    stdin = sys.stdin.fileno()
    pending = b""
    with open(args.log, "ab") as log:
        while True:
            ready, _, _ = select.select([stdin], [], [], args.every)
            emitted: list[str | None] = []
            if not ready:
                emitted.append(progress.tick(time.monotonic()))
            else:
                chunk = os.read(stdin, 65536)
                if not chunk:
                    break
                log.write(chunk)
                log.flush()
                *lines, pending = (pending + chunk).split(b"\n")
                for raw in lines:
                    emitted.append(progress.feed(raw.decode("utf-8", "replace"), time.monotonic()))
            for text in emitted:
                if text is not None:
                    print(text, file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
