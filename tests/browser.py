"""A real browser for the web page's tests: Debian's chromium, headless, driven by Playwright.

``open_page(url)`` yields a Playwright ``Page`` at ``url`` in a fresh profile; it skips the test,
with the reason, when Playwright or ``/usr/bin/chromium`` is missing (``scripts/setup.sh --dev``
installs chromium where it runs as root with apt). Every console error and page error is kept in
``page_errors(page)``: a test can assert the page ran clean. ``live_app(app)`` serves any ASGI app
(a gateway, a scripted server) on an ephemeral port of 127.0.0.1 for the page to load.
"""

from __future__ import annotations

import contextlib
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn

CHROMIUM = Path("/usr/bin/chromium")
# What works as root on a machine with no network: no sandbox (root), no GPU, nothing that phones home.
LAUNCH_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
WAIT_MS = 60_000  # the longest any one wait for the page may take


def skip_reason() -> str | None:
    """Why the browser tests cannot run here, or None."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (scripts/setup.sh --dev installs requirements-dev.txt)"
    if not CHROMIUM.exists():
        return f"{CHROMIUM} is missing (scripts/setup.sh --dev installs Debian's chromium when run as root with apt)"
    return None


def page_errors(page: Any) -> list[str]:
    errors: list[str] = page.peerinfer_errors
    return errors


@contextlib.contextmanager
def open_page(url: str, *, width: int = 1280, height: int = 800) -> Iterator[Any]:
    """A headless chromium page at ``url`` (a ``width`` x ``height`` viewport) in a new, empty profile."""
    reason = skip_reason()
    if reason is not None:
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory(prefix="peerinfer-chromium-") as profile, sync_playwright() as playwright:
        # A persistent context is how Playwright takes a --user-data-dir: a new empty one per page.
        context = playwright.chromium.launch_persistent_context(
            profile,
            executable_path=str(CHROMIUM),
            headless=True,
            args=LAUNCH_ARGS,
            viewport={"width": width, "height": height},
        )
        try:
            context.set_default_timeout(WAIT_MS)
            page = context.new_page()
            errors: list[str] = []
            page.peerinfer_errors = errors
            page.on("pageerror", lambda error: errors.append(f"page error: {error}"))
            page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
            page.goto(url)
            yield page
        finally:
            context.close()


@contextlib.contextmanager
def live_app(app: Any) -> Iterator[str]:
    """A real uvicorn serving ``app`` in a thread on 127.0.0.1; yields its base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        for _ in range(3000):
            if server.started or not thread.is_alive():
                break
            time.sleep(0.01)
        if not server.started:
            raise AssertionError("the app did not start serving")
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
