"""The real path: bundled Gemma 3 270M through llama.cpp, served by a real uvicorn, read by `openai`."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import openai
import pytest
import requests

from peerinfer.engine.llama import LlamaEngine
from tests.conftest import live_worker, worker_settings

pytestmark = pytest.mark.real

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def test_openai_package_non_streaming(real_worker: str) -> None:
    client = openai.OpenAI(base_url=real_worker + "/v1", api_key="unused")
    reply = client.chat.completions.create(model="gemma", messages=QUESTION, temperature=0, max_tokens=20)  # type: ignore[arg-type]
    assert "Paris" in (reply.choices[0].message.content or "")
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage is not None and reply.usage.completion_tokens > 0
    assert [model.id for model in client.models.list()] == ["gemma-3-270m-q4_k_m"]


def test_openai_package_streaming_with_usage(real_worker: str) -> None:
    client = openai.OpenAI(base_url=real_worker + "/v1", api_key="unused")
    stream = client.chat.completions.create(
        model="gemma",
        messages=QUESTION,  # type: ignore[arg-type]
        temperature=0,
        max_tokens=20,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert "Paris" in text
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1
    finish = [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices and chunk.choices[0].finish_reason]
    assert finish == ["stop"]


def test_openai_completions_respect_max_tokens(real_worker: str) -> None:
    client = openai.OpenAI(base_url=real_worker + "/v1", api_key="unused")
    reply = client.completions.create(model="gemma", prompt="The capital of India is", max_tokens=5, temperature=0)
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage is not None and reply.usage.completion_tokens == 5


def _stream_text(url: str, path: str, body: dict[str, object]) -> str:
    response = requests.post(url + path, json={**body, "stream": True}, stream=True, timeout=120)
    parts = []
    for line in response.iter_lines():
        if line.startswith(b"data: {"):
            choice = json.loads(line[6:])["choices"]
            if choice:
                parts.append(choice[0].get("delta", {}).get("content") or choice[0].get("text") or "")
    return "".join(parts)


SCRIPTS = {
    "hindi": "भारत एक विशाल देश है। इसकी राजधानी",
    "tamil": "தமிழ்நாடு இந்தியாவின் ஒரு மாநிலம். அதன் தலைநகரம்",
    "bengali": "বাংলাদেশের রাজধানী ঢাকা। ঢাকা একটি",
    "emoji": "Favourite emoji: 😀 🎉 🚀 🌍 🙏🏽 🇮🇳 and also",
}


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_streamed_text_equals_non_streamed_text_in_every_script(real_worker: str, script: str) -> None:
    body = {"prompt": SCRIPTS[script], "max_tokens": 40, "temperature": 0, "seed": 7}
    whole = requests.post(real_worker + "/v1/completions", json=body, timeout=120).json()["choices"][0]["text"]
    streamed = _stream_text(real_worker, "/v1/completions", body)
    assert streamed == whole
    assert "\ufffd" not in streamed
    assert any(ord(char) > 0x7F for char in streamed), "the model should answer in the prompt's script"


def test_chat_stream_equals_non_stream_in_hindi(real_worker: str) -> None:
    body = {"messages": [{"role": "user", "content": "भारत की राजधानी क्या है?"}], "max_tokens": 30, "temperature": 0}
    whole = requests.post(real_worker + "/v1/chat/completions", json=body, timeout=120).json()
    assert _stream_text(real_worker, "/v1/chat/completions", body) == whole["choices"][0]["message"]["content"]


def test_prompt_longer_than_context_is_refused_with_token_counts(real_worker: str) -> None:
    body = {"messages": [{"role": "user", "content": "word " * 2000}]}
    response = requests.post(real_worker + "/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 400
    message = response.json()["error"]["message"]
    assert "tokens but the context holds 1024" in message


def test_disconnected_clients_free_their_slots_for_the_next_request(real_worker: str) -> None:
    # Counting at temperature 0 goes on until max_tokens: each request would run for a long time.
    long = {"prompt": "1, 2, 3, 4, 5, 6,", "max_tokens": 900, "temperature": 0, "stream": True}
    streams = []
    for _ in range(4):  # fill every slot
        response = requests.post(real_worker + "/v1/completions", json=long, stream=True, timeout=60)
        lines = response.iter_lines()
        while not next(lines).startswith(b"data: {"):
            pass
        streams.append((response, lines))  # keep the reader alive too: dropping it closes the stream
    assert requests.get(real_worker + "/health", timeout=5).json()["slots_busy"] == 4
    # One stream stays: its tokens measure, in decoding steps rather than seconds, how long the three
    # abandoned slots take to free. Had they kept their slots, they would run as long as it does.
    (kept, kept_lines), abandoned = streams[0], streams[1:]
    ticks = [0]

    def count_tokens() -> None:
        with contextlib.suppress(requests.RequestException, AttributeError, ValueError):
            for line in kept_lines:
                ticks[0] += line.startswith(b"data: {")

    counter = threading.Thread(target=count_tokens, daemon=True)
    counter.start()
    for response, _ in abandoned:
        response.close()
    deadline = time.monotonic() + 300  # a guard against hanging, not a measurement
    while requests.get(real_worker + "/health", timeout=5).json()["slots_busy"] > 1:
        assert counter.is_alive() and time.monotonic() < deadline, "the abandoned slots were not freed"
        time.sleep(0.02)
    tokens_meanwhile = ticks[0]
    kept.close()
    counter.join(timeout=30)
    assert tokens_meanwhile < 300, f"the abandoned slots were freed only after {tokens_meanwhile} steps"
    reply = requests.post(
        real_worker + "/v1/chat/completions", json={"messages": QUESTION, "max_tokens": 5}, timeout=60
    )
    assert reply.status_code == 200


BATCH_PROMPTS = [
    "The history of the Indian railways begins in",
    "भारत की राजधानी नई दिल्ली है। दिल्ली",
    "Photosynthesis is the process by which",
    # Longer than one prefill chunk (64 tokens), so it is read in several steps while others generate.
    "Kerala is a state on the southwestern Malabar Coast of India. It was formed in 1956 by merging "
    "Malayalam-speaking regions. It is bordered by Karnataka to the north and northeast, Tamil Nadu to the "
    "east and south, and the Lakshadweep Sea to the west. With 33 million inhabitants, it is the "
    "thirteenth-largest Indian state by population. The capital of Kerala is",
]


def _complete(url: str, prompt: str) -> str:
    body = {"prompt": prompt, "max_tokens": 48, "temperature": 0}
    return str(requests.post(url + "/v1/completions", json=body, timeout=120).json()["choices"][0]["text"])


def test_four_streams_together_give_the_same_text_as_each_alone(real_worker: str) -> None:
    alone = [_complete(real_worker, prompt) for prompt in BATCH_PROMPTS]
    with ThreadPoolExecutor(len(BATCH_PROMPTS)) as pool:
        # Three first: where it is cheaper, their steps carry a throw-away row in the free 4th slot,
        # which the fourth stream then uses.
        three = list(pool.map(lambda prompt: _complete(real_worker, prompt), BATCH_PROMPTS[:3]))
        together = list(pool.map(lambda prompt: _complete(real_worker, prompt), BATCH_PROMPTS))
    assert all(text.strip() for text in alone)
    assert three == alone[:3]
    assert together == alone


# About 790 tokens: past 512 cached tokens, where llama.cpp's flash attention takes a split-KV kernel for
# a sequence decoded on its own (and not in a batch), which moved its logits by up to 0.75 here.
LONG_PROMPT = "def f(x):\n    return x * 2\n" * 60 + "# now write a function that"


def test_a_long_context_gives_the_same_text_together_as_alone(real_worker: str) -> None:
    prompts = [LONG_PROMPT, *BATCH_PROMPTS[:3]]
    alone = _complete(real_worker, LONG_PROMPT)
    with ThreadPoolExecutor(len(prompts)) as pool:
        together = list(pool.map(lambda prompt: _complete(real_worker, prompt), prompts))
    assert alone.strip()
    assert together[0] == alone


def _complete_with_usage(url: str, prompt: str) -> tuple[str, dict[str, Any]]:
    body = {"prompt": prompt, "max_tokens": 32, "temperature": 0}
    reply = requests.post(url + "/v1/completions", json=body, timeout=120).json()
    return str(reply["choices"][0]["text"]), reply["usage"]


def test_a_prompt_read_before_is_not_read_again_and_gives_the_same_text(real_worker: str) -> None:
    # Unique to this test, so that no slot holds any of it yet; ~790 tokens.
    prompt = LONG_PROMPT.replace("x * 2", "x + 7")
    variant = prompt.replace("# now write a function that", "# next, a class that")
    variant_fresh, usage = _complete_with_usage(real_worker, variant)
    assert usage["prompt_tokens_details"]["cached_tokens"] == 0
    # The prompt shares all but its last line with the variant: it reads only the chunks after them.
    prompt_first, usage = _complete_with_usage(real_worker, prompt)
    shared = usage["prompt_tokens_details"]["cached_tokens"]
    assert usage["prompt_tokens"] - 2 * 64 <= shared < usage["prompt_tokens"] - 1
    prompt_again, usage = _complete_with_usage(real_worker, prompt)
    assert usage["prompt_tokens_details"]["cached_tokens"] == usage["prompt_tokens"] - 1  # all but the last
    # Exactly the text of a fresh read, including while three other streams run.
    assert prompt_again == prompt_first
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda text: _complete_with_usage(real_worker, text), [variant, *BATCH_PROMPTS[:3]]))
    assert together[0][1]["prompt_tokens_details"]["cached_tokens"] > 0
    assert together[0][0] == variant_fresh
    assert variant_fresh.strip()
    metrics = requests.get(real_worker + "/metrics", timeout=10).text
    line = next(line for line in metrics.splitlines() if line.startswith("peerinfer_prompt_tokens_cached_total"))
    assert float(line.split()[1]) >= shared + usage["prompt_tokens_details"]["cached_tokens"]


def test_requests_sharing_a_prompt_at_once_copy_it_from_one_slot_and_give_the_same_text(real_worker: str) -> None:
    shared = LONG_PROMPT.replace("x * 2", "x - 5")  # unique to this test
    prompts = [shared.replace("# now write a function that", f"# task {n}: write a function that") for n in range(4)]
    # One after the other: the first reads the shared part, the others find it in that slot.
    alone = [_complete_with_usage(real_worker, prompt) for prompt in prompts]
    assert [usage["prompt_tokens_details"]["cached_tokens"] > 0 for _, usage in alone] == [False, True, True, True]
    # All at once: only one slot holds the shared part, so three requests copy it from there.
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda prompt: _complete_with_usage(real_worker, prompt), prompts))
    assert all(usage["prompt_tokens_details"]["cached_tokens"] > 0 for _, usage in together)
    assert [text for text, _ in together] == [text for text, _ in alone]


def test_a_prompt_that_goes_on_from_an_answer_reuses_it_and_gives_a_fresh_reads_text(real_worker: str) -> None:
    # A client that keeps a running transcript sends the last answer back inside its next prompt.
    first_prompt = "Question: Name three rivers of South India and where each one rises.\nAnswer:"
    answer, first = _complete_with_usage(real_worker, first_prompt)
    prompt = f"{first_prompt}{answer}\nQuestion: Which of them is the longest?\nAnswer:"
    text, usage = _complete_with_usage(real_worker, prompt)
    # The first prompt and the answer's tokens were still in the slot: only the new question was read.
    assert usage["prompt_tokens_details"]["cached_tokens"] > first["prompt_tokens"] + first["completion_tokens"] // 2
    fresh_engine = LlamaEngine(worker_settings(slots=2, n_ctx=1024, prefix_cache=False))
    fresh_engine.load()
    try:
        with live_worker(fresh_engine, worker_settings(slots=2, n_ctx=1024, prefix_cache=False)) as fresh:
            fresh_text, fresh_usage = _complete_with_usage(fresh, prompt)
    finally:
        fresh_engine.close()
    assert fresh_usage["prompt_tokens_details"]["cached_tokens"] == 0
    assert text == fresh_text and text.strip()


def test_sampling_with_a_seed_is_reproducible(real_worker: str) -> None:
    body = {"prompt": "Once upon a time in Chennai,", "max_tokens": 24, "temperature": 0.9, "top_p": 0.95}
    first = _complete_body(real_worker, {**body, "seed": 11})
    assert first == _complete_body(real_worker, {**body, "seed": 11})
    others = {_complete_body(real_worker, {**body, "seed": seed}) for seed in (1, 2, 3)}
    assert len(others | {first}) > 1, "different seeds should not all give the same text"


def _complete_body(url: str, body: dict[str, object]) -> str:
    return str(requests.post(url + "/v1/completions", json=body, timeout=120).json()["choices"][0]["text"])


def test_continuing_a_partial_answer_gives_the_rest_of_the_same_answer(real_worker: str) -> None:
    """What a client does when a peer dies mid-stream: send the partial answer back to continue."""
    messages = [{"role": "user", "content": "Why is the sky blue?"}]
    body = {"messages": messages, "max_tokens": 40, "temperature": 0}
    whole = requests.post(real_worker + "/v1/chat/completions", json=body, timeout=120).json()
    answer = whole["choices"][0]["message"]["content"]
    cut = answer.index(" ", len(answer) // 3)  # a word boundary, as a token boundary would be
    partial = answer[:cut]
    resumed_body = {
        "messages": [*messages, {"role": "assistant", "content": partial}],
        "continue_final_message": True,
        "max_tokens": 40,
        "temperature": 0,
    }
    resumed = requests.post(real_worker + "/v1/chat/completions", json=resumed_body, timeout=120).json()
    continuation = resumed["choices"][0]["message"]["content"]
    assert continuation.startswith(" ")  # continued mid-sentence, not restarted
    assert (partial + continuation).startswith(answer[: cut + 20])


@pytest.mark.parametrize(
    "extra",
    [
        {"messages": [{"role": "user", "content": "a\u0000b <eos><bos><start_of_turn>model\n"}]},
        {"seed": 123456789012345678901234567890, "temperature": 1.5, "top_p": 0.01, "top_k": 1000},
        {"seed": -5, "temperature": 2.0, "stop": ["\n", " ", ".", "a" * 200]},
    ],
)
def test_odd_but_valid_input_is_served_by_the_real_engine(real_worker: str, extra: dict[str, object]) -> None:
    body = {"messages": QUESTION, "max_tokens": 8, **extra}
    response = requests.post(real_worker + "/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["finish_reason"] in ("stop", "length")
    assert requests.get(real_worker + "/health", timeout=5).json()["status"] == "ok"
