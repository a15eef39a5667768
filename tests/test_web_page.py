"""The web page: what it is served with, its /network table, and what a person sees in a real browser.

The browser tests drive Debian's chromium through Playwright (tests/browser.py); they skip, with
the reason, where it is missing. The real ones talk to a worker on the bundled model.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import json
import math
import re
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import requests
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.testclient import TestClient

from peerinfer.api.network import MAX_FAILURE, MAX_TEXT, NetworkView, PeerRow, network_view
from peerinfer.engine.base import ModelInfo
from peerinfer.engine.fake import FakeEngine
from peerinfer.server.app import create_app
from peerinfer.web import STATIC_TYPES, page_router, static_file
from tests.browser import live_app, open_page, page_errors
from tests.conftest import REPO, live_worker, worker_settings
from tests.network_support import wait_until

HOSTILE_NAME = "<img src=x onerror=\"document.title='pwned'\">"
HOSTILE_REPLY = "<b>bold</b><script>document.title='pwned'</script> & done"
HINDI = "भारत की राजधानी क्या है?"
TAMIL = "தமிழ்நாட்டின் தலைநகரம் எது?"


@contextlib.contextmanager
def ready_client(engine: FakeEngine, **settings: object) -> Iterator[TestClient]:
    with TestClient(create_app(worker_settings(**settings), engine)) as client:
        wait_until(lambda: client.get("/health").status_code == 200, 30, "the fake worker did not load")
        yield client


# --- what the page is served with (no browser) --------------------------------------------------


def test_the_page_is_served_with_a_policy_that_allows_nothing_but_its_own_files() -> None:
    with ready_client(FakeEngine()) as client:
        reply = client.get("/")
        assert reply.status_code == 200
        assert reply.headers["content-type"].startswith("text/html")
        policy = reply.headers["content-security-policy"]
        assert "default-src 'self'" in policy and "script-src 'self'" in policy
        assert "unsafe-inline" not in policy and "unsafe-eval" not in policy
        assert reply.headers["x-content-type-options"] == "nosniff"
        for name, media_type in STATIC_TYPES.items():
            served = client.get(f"/static/{name}")
            assert served.status_code == 200, name
            assert served.headers["content-type"].startswith(media_type.split(";")[0])
            assert served.content == static_file(name)


def test_the_page_loads_nothing_from_the_internet_and_has_no_inline_script() -> None:
    html = static_file("index.html").decode()
    scripts = re.findall(r"<script\b[^>]*>", html)
    assert scripts and all(re.search(r'\bsrc="static/[\w.]+"', tag) for tag in scripts)
    assert not re.search(r"\son\w+\s*=", html)  # no inline event handlers either
    for name in STATIC_TYPES:
        text = static_file(name).decode()
        assert not re.search(r"(https?:)?//[\w.-]+\.[a-z]{2,}/", text.replace("http://www.w3.org/2000/svg", "")), name
        assert "@import" not in text and "innerHTML" not in text and "insertAdjacentHTML" not in text


def test_only_the_pages_own_files_are_served_and_no_path_reaches_the_disk() -> None:
    with ready_client(FakeEngine()) as client:
        for name in ("nope.js", "..%2Fapp.py", "%2e%2e%2f%2e%2e%2fsettings.py", "__init__.py", "worker.py"):
            reply = client.get(f"/static/{name}")
            assert reply.status_code == 404, name
            assert "error" in reply.json()
        assert client.get("/static/../server/app.py").status_code == 404


def test_the_page_and_its_table_keep_the_host_guard_against_dns_rebinding() -> None:
    with ready_client(FakeEngine()) as client:
        for path in ("/", "/static/app.js", "/network"):
            reply = client.get(path, headers={"Host": "evil.example"})
            assert reply.status_code == 400, path
            assert reply.json()["error"]["code"] == "host_not_allowed"
            assert client.get(path, headers={"Host": "127.0.0.1:8000"}).status_code == 200, path


def test_a_workers_network_table_is_the_worker_itself_with_its_live_slots_and_measured_speed() -> None:
    engine = FakeEngine(token_delay_s=0.002, slots=3)
    with ready_client(engine) as client:
        view = NetworkView.model_validate(client.get("/network").json())
        assert view.mode == "worker"
        (row,) = view.peers
        assert (row.model, row.sha256) == ("fake-model", engine.info.sha256)
        assert (row.verified, row.path, row.rtt_ms, row.banned) == (True, "direct", None, False)
        assert (row.slots_total, row.slots_busy, row.slots_free, row.queue) == (3, 0, 3, 0)
        assert row.tokens_per_s is None  # nothing served yet: nothing measured
        answer = client.post(
            "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 20}
        )
        assert answer.status_code == 200
        row = NetworkView.model_validate(client.get("/network").json()).peers[0]
        assert row.tokens_per_s is not None and row.tokens_per_s > 0


def test_with_an_api_key_the_page_is_public_but_the_table_needs_the_key() -> None:
    with ready_client(FakeEngine(), api_key="s3cret") as client:
        assert client.get("/").status_code == 200
        assert client.get("/network").status_code == 401
        assert client.get("/network", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert client.get("/network", headers={"Authorization": "Bearer s3cret"}).status_code == 200


@dataclasses.dataclass
class Facts:
    """What a router knows of a peer (the shape of peerinfer.client.core.PeerView)."""

    peer_id: str = "peer-a"
    url: str = "http://10.0.0.1:8000"
    model: str = "gemma"
    sha256: str = "ab" * 32
    verified: bool = True
    slots_total: int = 4
    slots_free: int = 3
    queue: int = 0
    rtt_ms: float | None = 12.5
    tokens_per_s: float | None = 40.0
    claimed_tokens_per_s: float = 50.0
    age_s: float = 3.0
    path: str = "direct"
    banned: bool = False
    last_failure: str | None = None


def test_a_lying_peers_facts_become_a_bounded_row_never_an_error() -> None:
    liar = Facts(
        peer_id="p" * 5000,
        model=HOSTILE_NAME * 100,
        sha256="f" * 500,
        slots_total=2,
        slots_free=9,
        queue=-4,
        rtt_ms=math.nan,
        tokens_per_s=math.inf,
        claimed_tokens_per_s=-1.0,
        age_s=math.nan,
        path="wormhole",
        last_failure="x" * 10_000,
    )
    view = network_view("the DHT through 127.0.0.1:4222", [liar])
    (row,) = view.peers
    assert len(row.id) == MAX_TEXT and len(row.model) == MAX_TEXT and len(row.sha256) == 64
    assert (row.slots_total, row.slots_free, row.slots_busy, row.queue) == (2, 2, 0, 0)
    assert (row.rtt_ms, row.tokens_per_s, row.claimed_tokens_per_s, row.age_s) == (None, None, 0.0, 0.0)
    assert row.path == "direct"
    assert row.last_failure is not None and len(row.last_failure) == MAX_FAILURE
    json.dumps(view.model_dump(mode="json"), allow_nan=False)  # what JSONResponse sends: finite numbers only


def test_the_gateway_table_lists_verified_working_peers_first() -> None:
    rows = network_view(
        "the LAN",
        [
            Facts(peer_id="banned", url="http://a", banned=True),
            Facts(peer_id="unverified", url="http://b", verified=False),
            Facts(peer_id="good-2", url="http://d"),
            Facts(peer_id="good-1", url="http://c", slots_free=0, path="relayed"),
        ],
    ).peers
    assert [row.id for row in rows] == ["good-1", "good-2", "unverified", "banned"]
    assert (rows[0].slots_busy, rows[0].path) == (4, "relayed")


# --- scripts/install_system.sh (called by setup.sh --dev) -------------------------------------


def stub(directory: Path, name: str, script: str) -> None:
    path = directory / name
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(0o755)


def run_installer(tmp_path: Path, uid: str, apt: str | None) -> tuple[subprocess.CompletedProcess[str], str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "apt-calls"
    stub(bin_dir, "id", f"echo {uid}\n")
    if apt is not None:
        stub(bin_dir, "apt-get", f'echo "$*" >> {calls}\n{apt}\n')
    env = {"PATH": str(bin_dir), "PEERINFER_CHROMIUM": str(tmp_path / "no-chromium"), "TMPDIR": str(tmp_path)}
    result = subprocess.run(
        ["/bin/bash", str(REPO / "scripts" / "install_system.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return result, calls.read_text() if calls.exists() else ""


def test_setup_installs_chromium_with_apt_when_root_and_it_is_missing(tmp_path: Path) -> None:
    result, calls = run_installer(tmp_path, "0", "exit 0")
    assert result.returncode == 0
    install = calls.splitlines()[0]
    assert install.startswith("install -y -q --no-install-recommends chromium")
    assert result.stderr.count("\n") == 1 and "installing chromium" in result.stderr
    assert "iproute2" in install.split()  # `ip` is missing from this PATH: the namespace tests need it


def test_setup_updates_the_package_lists_when_the_first_install_fails(tmp_path: Path) -> None:
    # Fails until "update" ran once, as on a fresh machine without package lists.
    result, calls = run_installer(
        tmp_path, "0", f'case "$1" in update) : > {tmp_path}/updated;; install) [ -f {tmp_path}/updated ];; esac'
    )
    assert result.returncode == 0
    assert [line.split()[0] for line in calls.splitlines()] == ["install", "update", "install"]
    assert "could not" not in result.stderr


@pytest.mark.parametrize(("uid", "apt"), [("1000", "exit 0"), ("0", None), ("0", "exit 100")])
def test_setup_never_fails_for_the_browser_and_says_the_tests_will_skip(
    tmp_path: Path, uid: str, apt: str | None
) -> None:
    result, calls = run_installer(tmp_path, uid, apt)
    assert result.returncode == 0
    assert "the browser, namespace and NAT lab tests will be skipped" in result.stderr
    if uid != "0":
        assert calls == ""  # never tries apt without root


# --- in a real browser: fake engines and a scripted gateway --------------------------------------


class HostileNameEngine(FakeEngine):
    """A fake engine whose model calls itself with markup; its replies are markup too."""

    def __init__(self) -> None:
        super().__init__(lambda prompt: HOSTILE_REPLY)

    @property
    def info(self) -> ModelInfo:
        return dataclasses.replace(super().info, model_id=HOSTILE_NAME)


def wait_answer(page: Any, count: int = 1) -> Any:
    """The ``count``-th answer once it finished (done, stopped, failed or cut)."""
    answer = page.locator(".msg.assistant").nth(count - 1)
    answer.and_(page.locator("[data-state]")).wait_for()
    return answer


def test_a_model_name_and_an_answer_made_of_markup_show_as_text_and_run_nothing() -> None:
    engine = HostileNameEngine()
    engine.load()
    with live_worker(engine) as url, open_page(url) as page:
        page.locator("#model option").first.wait_for(state="attached")
        assert page.locator("#model option").all_text_contents() == [HOSTILE_NAME]
        page.locator("#peers .model-cell").wait_for()
        assert page.locator("#peers .model-cell").inner_text() == HOSTILE_NAME
        page.fill("#prompt", "hello")
        page.press("#prompt", "Enter")
        answer = wait_answer(page)
        assert answer.locator(".text").text_content() == HOSTILE_REPLY
        assert answer.get_attribute("data-state") == "done"
        assert page.evaluate("document.querySelectorAll('img, b, script:not([src])').length") == 0
        assert page.title() == "peerinfer"
        assert page_errors(page) == []


def test_with_an_api_key_the_page_asks_for_it_and_keeps_it_for_the_tab() -> None:
    engine = FakeEngine(lambda prompt: "hello back")
    engine.load()
    with live_worker(engine, worker_settings(api_key="k3y")) as url, open_page(url) as page:
        page.locator("#api-key[aria-invalid=true]").wait_for()
        assert "API key" in page.locator("#status").inner_text()
        page.fill("#api-key", "k3y")
        page.press("#api-key", "Tab")  # a change event
        page.locator("#model option").first.wait_for(state="attached")
        assert page.evaluate("sessionStorage.getItem('peerinfer.api_key')") == "k3y"
        page.fill("#prompt", "hello")
        page.press("#prompt", "Enter")
        answer = wait_answer(page)
        assert answer.locator(".text").text_content() == "hello back"
        page.reload()
        assert page.input_value("#api-key") == "k3y"
        page.locator("#peers .model-cell").wait_for()  # the table, with the key, after a reload
        page.locator("#model option").first.wait_for(state="attached")
        assert page.get_attribute("#api-key", "aria-invalid") is None


def test_keyboard_and_screen_reader_basics() -> None:
    engine = FakeEngine(lambda prompt: "a slow answer " * 40, token_delay_s=0.01)
    engine.load()
    with live_worker(engine) as url, open_page(url) as page:
        for name in ("Message", "Model", "System prompt", "Temperature", "Max tokens", "API key"):
            assert page.get_by_label(name, exact=True).count() == 1, name
        for name in ("Send", "Stop", "Regenerate", "New chat"):
            assert page.get_by_role("button", name=name, exact=True).count() == 1, name
        assert page.get_attribute("#conversation", "aria-live") == "polite"
        assert page.locator("main").count() == 1 and page.locator("header").count() == 1
        page.keyboard.press("Tab")  # the first stop is the skip link, and it leads to the message box
        assert page.evaluate("document.activeElement.className") == "skip"
        page.keyboard.press("Enter")
        page.keyboard.type("hello")
        assert page.input_value("#prompt") == "hello"
        outline = page.evaluate("getComputedStyle(document.activeElement).outlineStyle")
        assert outline not in ("", "none")  # focus is visible
        page.keyboard.press("Enter")
        page.locator(".msg.assistant .text").filter(has_text="slow").wait_for()
        assert page.get_attribute("#conversation", "aria-busy") == "true"
        page.keyboard.press("Escape")
        answer = wait_answer(page)
        assert answer.get_attribute("data-state") == "stopped"
        assert page.get_attribute("#conversation", "aria-busy") == "false"
        assert page_errors(page) == []


# A scripted gateway: the page's routes, a two-peer /network, and a stream that resumes on a second
# peer, written in pieces that cut UTF-8 characters in half.
GATEWAY_PIECES = ["नमस्ते, ", "यह उत्तर ", "दो पीयर ", "से आया।"]
SWITCH_REASON = "connection lost <b>mid-answer</b>"


def gateway_rows(queue: int) -> NetworkView:
    return network_view(
        "the DHT through 127.0.0.1:4222",
        [
            Facts(peer_id="peer-a", url="http://10.0.0.1:8000", queue=queue),
            Facts(peer_id="peer-b", url="http://10.0.0.2:8000"),
        ],
    )


def chunk(content: str | None, **extra: Any) -> bytes:
    delta: dict[str, Any] = {"content": content} if content is not None else {"role": "assistant"}
    payload = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    payload["choices"] = [{"index": 0, "delta": delta, "finish_reason": None}]
    payload.update(extra)
    return b"data: " + json.dumps(payload, ensure_ascii=False).encode() + b"\n\n"


async def scripted_stream() -> AsyncIterator[bytes]:
    resumed_at = len("".join(GATEWAY_PIECES[:2]))
    events = [
        chunk(None, peerinfer={"peer": "peer-a", "url": "http://10.0.0.1:8000"}),
        chunk(GATEWAY_PIECES[0]),
        chunk(GATEWAY_PIECES[1]),
        b": keep-alive\n\n",
        chunk(
            GATEWAY_PIECES[2],
            peerinfer={
                "peer": "peer-b",
                "url": "http://10.0.0.2:8000",
                "switch": {
                    "from": "http://10.0.0.1:8000",
                    "to": "http://10.0.0.2:8000",
                    "reason": SWITCH_REASON,
                    "resumed_chars": resumed_at,
                },
            },
        ),
        chunk(GATEWAY_PIECES[3]),
        b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m","choices":[],'
        b'"usage":{"prompt_tokens":5,"completion_tokens":9,"total_tokens":14},'
        b'"peerinfer":{"peers":["http://10.0.0.1:8000","http://10.0.0.2:8000"],"failovers":0,"resumes":1}}\n\n',
        b"data: [DONE]\n\n",
    ]
    for event in events:
        # Each event in two writes; where it has a character of several bytes, the cut is inside it.
        wide = next((index for index, byte in enumerate(event) if byte >= 0x80), len(event) // 2)
        for piece in (event[: wide + 1], event[wide + 1 :]):
            yield piece
            await asyncio.sleep(0.05)


def scripted_gateway() -> FastAPI:
    app = FastAPI()
    calls = itertools.count(1)

    async def network(request: Request) -> NetworkView:
        return gateway_rows(queue=next(calls))  # each look at the network finds a longer queue

    app.include_router(page_router(network))

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        return JSONResponse({"object": "list", "data": [{"id": "gemma", "object": "model"}]})

    @app.post("/v1/chat/completions")
    async def chat() -> StreamingResponse:
        return StreamingResponse(scripted_stream(), media_type="text/event-stream")

    return app


def test_an_answer_that_moved_between_peers_names_both_and_notes_the_resume() -> None:
    with live_app(scripted_gateway()) as url, open_page(url) as page:
        page.locator("#peers tbody tr").nth(1).wait_for()
        assert "gateway" in page.locator("#mode").inner_text()
        assert "127.0.0.1:4222" in page.locator("#network-source").inner_text()
        table = page.locator("#peers tbody").inner_text()
        assert "10.0.0.1:8000" in table and "10.0.0.2:8000" in table
        page.fill("#prompt", "hello")
        page.press("#prompt", "Enter")
        answer = wait_answer(page)
        assert answer.get_attribute("data-state") == "done"
        assert answer.locator(".text").text_content() == "".join(GATEWAY_PIECES)
        assert answer.locator(".text").get_attribute("lang") == "hi"
        served = answer.locator(".peer").inner_text()
        assert "peer-a (http://10.0.0.1:8000), then peer-b (http://10.0.0.2:8000)" in served
        notes = answer.locator(".note").all_inner_texts()
        resumed = len("".join(GATEWAY_PIECES[:2]))
        assert notes[0] == (
            f"Resumed on http://10.0.0.2:8000 after {resumed} characters: http://10.0.0.1:8000 failed "
            f"({SWITCH_REASON})."
        )
        assert notes[1].startswith("2 peers served this answer")
        assert "9 tokens" in answer.locator(".tps").inner_text()
        assert page.evaluate("document.querySelectorAll('b').length") == 0
        queue = page.locator("#peers tbody tr").first.locator("td").nth(4)
        shown = int(queue.inner_text())
        wait_until(lambda: int(queue.inner_text()) > shown, 30, "the network table did not refresh by itself")
        assert page_errors(page) == []


# --- in a real browser, on a real worker with the bundled model ----------------------------------

RECORD_TEXT = """() => {
  window.__seen = [];
  const list = document.getElementById('conversation');
  new MutationObserver(() => {
    const answer = list.querySelector('.msg.assistant:last-child');
    if (!answer) return;
    window.__seen.push([answer.querySelector('.text').textContent.length, answer.dataset.state || null]);
  }).observe(list, {subtree: true, childList: true, characterData: true, attributes: true});
}"""


def settle(page: Any, *, temperature: str, max_tokens: str) -> None:
    page.locator("#model option").first.wait_for(state="attached")
    page.fill("#temperature", temperature)
    page.fill("#max-tokens", max_tokens)


def chat_bodies(page: Any) -> list[dict[str, Any]]:
    bodies: list[dict[str, Any]] = []
    page.on(
        "request",
        lambda request: (
            bodies.append(json.loads(request.post_data or "{}"))
            if request.url.endswith("/v1/chat/completions")
            else None
        ),
    )
    return bodies


@pytest.mark.real
def test_a_prompt_streams_piece_by_piece_with_its_ttft_speed_and_the_worker_listed(real_worker: str) -> None:
    with open_page(real_worker) as page:
        settle(page, temperature="0", max_tokens="40")
        page.locator("#peers .model-cell").wait_for()
        row = page.locator("#peers tbody tr").inner_text()
        assert "gemma" in row.lower() and "yes" in row and "direct" in row
        assert page.locator("#mode").inner_text() == "one worker"
        page.evaluate(RECORD_TEXT)
        page.click("#prompt")
        page.keyboard.type("Write a story about a lighthouse keeper.")
        page.keyboard.press("Shift+Enter")
        page.keyboard.type("Make it short.")
        assert page.locator(".msg").count() == 0  # Shift+Enter is a new line, not a send
        page.keyboard.press("Enter")
        answer = wait_answer(page)
        assert page.locator(".msg.user .text").text_content() == (
            "Write a story about a lighthouse keeper.\nMake it short."
        )
        final = answer.locator(".text").text_content()
        assert answer.get_attribute("data-state") == "done" and len(final) > 20
        seen = page.evaluate("window.__seen")
        growing = sorted({length for length, state in seen if state is None and 0 < length < len(final)})
        assert len(growing) >= 3, f"the answer arrived in too few pieces: {seen}"
        assert re.fullmatch(r"TTFT \d+ ms", answer.locator(".ttft").inner_text())
        assert re.fullmatch(r"\d+\.\d tokens/s \(\d+ tokens\)", answer.locator(".tps").inner_text())
        assert answer.locator(".peer").inner_text() == "served by this worker"
        assert page_errors(page) == []


@pytest.mark.real
def test_stop_from_the_keyboard_ends_the_answer_and_frees_the_workers_slot(real_worker: str) -> None:
    with open_page(real_worker) as page:
        # Counting at temperature 0 goes on to the token limit: the answer cannot end on its own before
        # Stop is pressed (a story at temperature 0.8 sometimes ended early, and Send took the focus).
        settle(page, temperature="0", max_tokens="700")
        page.fill("#prompt", "Count from 1 to 1000: 1, 2, 3, 4,")
        page.press("#prompt", "Enter")
        page.locator(".msg.assistant .text").filter(has_text=re.compile(r"\S")).wait_for()
        page.keyboard.press("Tab")  # from the message box, the next stop is Stop (Send is disabled)
        assert page.evaluate("document.activeElement.id") == "stop"
        page.keyboard.press("Enter")
        answer = wait_answer(page)
        assert answer.get_attribute("data-state") == "stopped"
        assert page.locator("#status").inner_text() == "Stopped."
        wait_until(
            lambda: requests.get(real_worker + "/health", timeout=5).json()["slots_busy"] == 0,
            30,
            "the worker kept decoding after Stop",
        )
        kept = answer.locator(".text").text_content()
        page.wait_for_timeout(500)
        assert answer.locator(".text").text_content() == kept
        assert page.is_enabled("#send") and page.is_disabled("#stop")
        assert page_errors(page) == []


@pytest.mark.real
def test_regenerate_asks_again_with_the_same_conversation_and_replaces_the_answer(real_worker: str) -> None:
    with open_page(real_worker) as page:
        bodies = chat_bodies(page)
        settle(page, temperature="0", max_tokens="24")
        page.fill("#system", "You answer briefly.")
        page.fill("#prompt", "What is a lighthouse?")
        page.press("#prompt", "Enter")
        first = wait_answer(page).locator(".text").text_content()
        page.click("#regenerate")
        page.locator(".msg.assistant[data-state]").wait_for()  # the old answer is gone, the new one done
        assert len(bodies) == 2 and bodies[1]["messages"] == bodies[0]["messages"]
        assert bodies[0]["messages"] == [
            {"role": "system", "content": "You answer briefly."},
            {"role": "user", "content": "What is a lighthouse?"},
        ]
        assert page.locator(".msg.assistant").count() == 1
        assert page.locator(".msg.assistant .text").text_content() == first  # temperature 0: the same answer
        page.fill("#prompt", "And a harbour?")
        page.press("#prompt", "Enter")
        wait_answer(page, 2)
        assert [m["role"] for m in bodies[2]["messages"]] == ["system", "user", "assistant", "user"]
        assert bodies[2]["messages"][2]["content"] == first
        assert page_errors(page) == []


@pytest.mark.real
@pytest.mark.parametrize(("prompt", "lang"), [(HINDI, "hi"), (TAMIL, "ta")])
def test_hindi_and_tamil_show_exactly_what_the_api_answers(real_worker: str, prompt: str, lang: str) -> None:
    with open_page(real_worker) as page:
        bodies = chat_bodies(page)
        settle(page, temperature="0", max_tokens="32")
        page.fill("#prompt", prompt)
        assert page.get_attribute("#prompt", "lang") == lang
        page.press("#prompt", "Enter")
        shown = wait_answer(page).locator(".text").text_content()
        user = page.locator(".msg.user .text")
        assert user.text_content() == prompt and user.get_attribute("lang") == lang
    client = openai.OpenAI(base_url=real_worker + "/v1", api_key="none", max_retries=0)
    direct = client.chat.completions.create(
        model=bodies[0]["model"], messages=bodies[0]["messages"], temperature=0, max_tokens=32
    )
    assert bodies[0]["messages"] == [{"role": "user", "content": prompt}]
    assert shown and shown == direct.choices[0].message.content


@pytest.mark.real
def test_a_phone_screen_has_no_horizontal_scroll(real_worker: str) -> None:
    with open_page(real_worker, width=360, height=740) as page:
        settle(page, temperature="0", max_tokens="24")
        page.locator("#peers .model-cell").wait_for()
        page.fill("#prompt", TAMIL + " " + "ஆ" * 80 + " https://example.invalid/" + "x" * 120)
        page.press("#prompt", "Enter")
        wait_answer(page)
        widths = page.evaluate(
            "[document.documentElement.scrollWidth, document.documentElement.clientWidth,"
            " Math.max(...[...document.querySelectorAll('main > section')].map(s => s.getBoundingClientRect().right))]"
        )
        scroll_width, client_width, right = widths
        assert client_width == 360 and scroll_width <= client_width and right <= client_width
        for control in ("#send", "#stop", "#prompt", "#model"):
            box = page.locator(control).bounding_box()
            assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= 360, control


def test_no_browser_here_is_a_skip_with_the_reason_not_a_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    import tests.browser as browser

    monkeypatch.setattr(browser, "CHROMIUM", Path("/nonexistent/chromium"))
    reason = browser.skip_reason()
    assert reason is not None and "setup.sh --dev" in reason


def test_the_page_reads_every_field_of_a_table_row() -> None:
    page_js = static_file("app.js").decode()
    for field in PeerRow.model_fields:
        assert f"peer.{field}" in page_js, field
