"""What the gateway sends its client, stitched from the events of a routed answer. Pure.

A routed answer may come from several peers: the first one dies mid-stream and another continues
from the text so far. The client must not notice. ``StreamStitcher`` turns the peers' events into
the chunks of ONE stream:

- every chunk carries the gateway's own ``id`` and ``created``, the same all along, and one ``model``
  (the client's, else the first peer's);
- the first peer's opening chunk (``role: "assistant"``) passes; a later peer's is dropped, and so is
  a role in any later delta: a client that sees a second role may start a second message;
- a peer's chunk with a ``finish_reason`` is held back until the stream goes on or ends: a peer that
  sent its finish and then died before ``[DONE]`` is resumed elsewhere, and its finish must then
  not reach the client;
- the peers' own ``usage`` chunks never pass (each covers only its part, and the gateway always asks
  for them); a client that asked for usage gets one at the end, covering the whole answer;
- the ``peerinfer`` object names the serving peer on the first chunk and again after each switch
  (with the switch), and on the last chunk before ``[DONE]`` lists every peer and counts the moves.

A peer's payload is hostile: only the known keys of a chunk pass, each type-checked, and whatever
does not check is dropped (never raised: a peer's garbage must not end the client's stream).
``whole_answer`` does the same for a non-streamed answer.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import Any, Literal, Protocol

from peerinfer.api.openai import new_id

Kind = Literal["chat", "completion"]
MAX_CHOICES = 64
MAX_TEXT = 1 << 20
MAX_SHORT = 256
MAX_LOGPROB_ENTRIES = 4096
MAX_TOP = 64
MAX_TOOL_CALLS = 128
FINISH_REASONS = frozenset({"stop", "length", "tool_calls", "content_filter", "function_call"})
OBJECTS = {"chat": "chat.completion.chunk", "completion": "text_completion"}
WHOLE_OBJECTS = {"chat": "chat.completion", "completion": "text_completion"}
ID_PREFIXES = {"chat": "chatcmpl", "completion": "cmpl"}
NOTE = "peerinfer"


class SwitchFacts(Protocol):
    """What a move to another peer says: ``peerinfer.client.answer.Switch`` has these attributes."""

    @property
    def from_url(self) -> str: ...
    @property
    def to_url(self) -> str: ...
    @property
    def reason(self) -> str: ...
    @property
    def resumed_chars(self) -> int: ...


# --- type checks of a peer's values ---------------------------------------------------------


def _text(value: Any, limit: int = MAX_TEXT) -> str | None:
    return value if isinstance(value, str) and len(value) <= limit else None


def _int(value: Any, low: int = 0, high: int = 1 << 31) -> int | None:
    return value if type(value) is int and low <= value <= high else None


def _number(value: Any) -> float | None:
    if type(value) not in (int, float) or not math.isfinite(value):
        return None
    return float(value)


def _byte_list(value: Any) -> list[int] | None:
    if not isinstance(value, list) or len(value) > 1024 or not all(_int(byte, 0, 255) is not None for byte in value):
        return None
    return list(value)


def _top_entry(value: Any) -> dict[str, Any] | None:
    if not isinstance(value, dict):
        return None
    token, logprob = _text(value.get("token"), MAX_SHORT * 4), _number(value.get("logprob"))
    if token is None or logprob is None:
        return None
    entry: dict[str, Any] = {"token": token, "logprob": logprob}
    if "bytes" in value:
        entry["bytes"] = _byte_list(value["bytes"])
    return entry


def _chat_logprob_list(value: Any) -> list[dict[str, Any]] | None:
    if not isinstance(value, list) or len(value) > MAX_LOGPROB_ENTRIES:
        return None
    entries = []
    for item in value:
        entry = _top_entry(item)
        tops = item.get("top_logprobs") if isinstance(item, dict) else None
        if entry is None or not isinstance(tops, list) or len(tops) > MAX_TOP:
            return None
        checked = [_top_entry(top) for top in tops]
        if any(top is None for top in checked):
            return None
        entry["top_logprobs"] = checked
        entries.append(entry)
    return entries


def _chat_logprobs(value: Any) -> dict[str, Any] | None:
    """OpenAI's chat ``logprobs`` (``content`` and ``refusal`` lists), or None when it does not check."""
    if not isinstance(value, dict):
        return None
    checked: dict[str, Any] = {}
    for name in ("content", "refusal"):
        part = value.get(name)
        checked[name] = None if part is None else _chat_logprob_list(part)
        if part is not None and checked[name] is None:
            return None
    return checked


def _legacy_logprobs(value: Any) -> dict[str, Any] | None:
    """The completions' legacy ``logprobs`` (four parallel lists), or None when it does not check."""
    if not isinstance(value, dict):
        return None
    parts = [value.get(name) for name in ("tokens", "token_logprobs", "top_logprobs", "text_offset")]
    lists = [part for part in parts if isinstance(part, list) and len(part) <= MAX_LOGPROB_ENTRIES]
    if len(lists) != len(parts):
        return None
    tokens, logprobs, tops, offsets = lists
    if not all(_text(token, MAX_SHORT * 4) is not None for token in tokens):
        return None
    if not all(logprob is None or _number(logprob) is not None for logprob in logprobs):
        return None
    if not all(_int(offset) is not None for offset in offsets):
        return None
    for top in tops:
        if top is None:
            continue
        if not isinstance(top, dict) or len(top) > MAX_TOP:
            return None
        if not all(_text(key, MAX_SHORT * 4) is not None and _number(v) is not None for key, v in top.items()):
            return None
    return {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": tops, "text_offset": offsets}


def _tool_calls(value: Any, streamed: bool) -> list[dict[str, Any]] | None:
    """Tool calls (a streamed delta's, where every field but ``index`` may be left out), or None."""
    if not isinstance(value, list) or len(value) > MAX_TOOL_CALLS:
        return None
    calls = []
    for call in value:
        if not isinstance(call, dict):
            return None
        checked: dict[str, Any] = {}
        if streamed:
            index = _int(call.get("index"), 0, MAX_TOOL_CALLS * 64)
            if index is None:
                return None
            checked["index"] = index
        for name in ("id", "type"):
            if name in call:
                text = _text(call[name], MAX_SHORT)
                if text is None or (name == "type" and text != "function"):
                    return None
                checked[name] = text
        function = call.get("function")
        if function is not None:
            if not isinstance(function, dict):
                return None
            parts = {}
            for name in ("name", "arguments"):
                if name in function:
                    text = _text(function[name])
                    if text is None:
                        return None
                    parts[name] = text
            checked["function"] = parts
        elif not streamed:
            return None
        calls.append(checked)
    return calls


def _finish_reason(value: Any) -> str | None:
    return value if isinstance(value, str) and value in FINISH_REASONS else None


def _chat_delta(value: Any) -> dict[str, Any]:
    delta: dict[str, Any] = {}
    if not isinstance(value, dict):
        return delta
    if value.get("role") == "assistant":
        delta["role"] = "assistant"
    for name in ("content", "refusal"):
        text = _text(value.get(name))
        if text is not None:
            delta[name] = text
    if "tool_calls" in value:
        calls = _tool_calls(value["tool_calls"], streamed=True)
        if calls:
            delta["tool_calls"] = calls
    return delta


def stream_choice(value: Any, kind: Kind) -> dict[str, Any] | None:
    """One choice of a streamed chunk with only its known, checked keys; None if it is not one."""
    if not isinstance(value, dict):
        return None
    index = _int(value.get("index", 0), 0, MAX_CHOICES - 1)
    if index is None:
        return None
    choice: dict[str, Any] = {"index": index}
    if kind == "chat":
        choice["delta"] = _chat_delta(value.get("delta"))
        choice["logprobs"] = _chat_logprobs(value.get("logprobs"))
    else:
        choice["text"] = _text(value.get("text")) or ""
        choice["logprobs"] = _legacy_logprobs(value.get("logprobs"))
    choice["finish_reason"] = _finish_reason(value.get("finish_reason"))
    return choice


def _carries(choice: dict[str, Any]) -> bool:
    """Whether a choice says anything: text, a role, tool calls, a refusal, log-probabilities or a finish."""
    if choice["finish_reason"] is not None or choice["logprobs"] is not None:
        return True
    if "text" in choice:
        return bool(choice["text"])
    delta = choice["delta"]
    return bool(delta.get("content") or delta.get("refusal") or delta.get("tool_calls") or "role" in delta)


def usage_object(prompt_tokens: int | None, completion_tokens: int) -> dict[str, Any]:
    prompt = prompt_tokens or 0
    return {"prompt_tokens": prompt, "completion_tokens": completion_tokens, "total_tokens": prompt + completion_tokens}


def error_event(message: str, code: str = "peer_failed", error_type: str = "server_error") -> dict[str, Any]:
    """The payload of the error event that ends a stream that cannot go on (OpenAI's error shape)."""
    return {"error": {"message": message, "type": error_type, "param": None, "code": code}}


def checked_error(value: Any) -> dict[str, Any] | None:
    """A worker's OpenAI error object with only its string fields, bounded; None if it is not one."""
    if not isinstance(value, dict) or _text(value.get("message"), 100_000) is None:
        return None
    checked: dict[str, Any] = {"message": " ".join(value["message"].split())[:1000]}
    for name in ("type", "param", "code"):
        checked[name] = _text(value.get(name), 10_000)
        if checked[name] is not None:
            checked[name] = checked[name][:200]
    return checked


def switch_note(switch: SwitchFacts) -> dict[str, Any]:
    return {
        "from": switch.from_url,
        "to": switch.to_url,
        "reason": switch.reason[:300],
        "resumed_chars": switch.resumed_chars,
    }


# --- the stream -------------------------------------------------------------------------------


class StreamStitcher:
    """Turns a routed answer's events into the client's chunks: ``opened``/``chunk`` as they come, ``finish``.

    Each method returns the payloads to send now, in order (``peerinfer.api.sse.event`` frames them).
    """

    def __init__(
        self,
        kind: Kind,
        *,
        model: str | None,
        wants_usage: bool,
        request_id: str | None = None,
        created: int | None = None,
    ) -> None:
        self.kind = kind
        self.id = request_id or new_id(ID_PREFIXES[kind])
        self.created = created if created is not None else int(time.time())
        self.model = model
        self.wants_usage = wants_usage
        self.peers: list[str] = []
        self.failovers = 0
        self.resumes = 0
        self.sent = 0  # chunks sent to the client
        self._roles: set[int] = set()  # the choices whose role the client has
        self._note: dict[str, Any] | None = None  # goes on the next chunk sent
        self._held: list[dict[str, Any]] = []  # chunks with a finish, held until the stream goes on or ends

    def _frame(self, choices: list[dict[str, Any]], fingerprint: str | None) -> dict[str, Any]:
        chunk: dict[str, Any] = {
            "id": self.id,
            "object": OBJECTS[self.kind],
            "created": self.created,
            "model": self.model or "unknown",
        }
        if fingerprint is not None:
            chunk["system_fingerprint"] = fingerprint
        chunk["choices"] = choices
        return chunk

    def _send(self, chunks: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if chunks and self._note is not None:
            chunks[0][NOTE] = self._note
            self._note = None
        self.sent += len(chunks)
        return chunks

    def opened(self, peer_id: str, url: str, switch: SwitchFacts | None) -> list[dict[str, Any]]:
        """A peer accepted the request; after a switch, what was held back from the last peer (its finish dropped)."""
        self.peers.append(url)
        note: dict[str, Any] = {"peer": peer_id, "url": url}
        released: list[dict[str, Any]] = []
        if switch is not None:
            note["switch"] = switch_note(switch)
            if switch.resumed_chars > 0:
                self.resumes += 1
            else:
                self.failovers += 1
            for chunk in self._held:  # that finish was not the end: keep what else the chunk said
                for choice in chunk["choices"]:
                    choice["finish_reason"] = None
                chunk["choices"] = [choice for choice in chunk["choices"] if _carries(choice)]
                if chunk["choices"]:
                    released.append(chunk)
            self._held = []
        self._note = note
        return self._send(released)

    def chunk(self, payload: Mapping[str, Any]) -> list[dict[str, Any]]:
        """One event of the serving peer's stream; what to send now (maybe nothing)."""
        raw = payload.get("choices")
        if not isinstance(raw, list):
            return []
        choices = []
        for value in raw[:MAX_CHOICES]:
            choice = stream_choice(value, self.kind)
            if choice is None:
                continue
            if "delta" in choice and "role" in choice["delta"]:
                if choice["index"] in self._roles:
                    del choice["delta"]["role"]  # a later peer's opening: the client has this choice's role
                else:
                    self._roles.add(choice["index"])
            if _carries(choice):
                choices.append(choice)
        if not choices:
            return []  # a usage chunk, a later peer's opening, or nothing checkable
        if self.model is None:
            self.model = _text(payload.get("model"), MAX_SHORT) or "unknown"
        chunk = self._frame(choices, _text(payload.get("system_fingerprint"), MAX_SHORT))
        if any(choice["finish_reason"] is not None for choice in choices):
            self._held.append(chunk)
            return []
        held, self._held = self._held, []
        return self._send([*held, chunk])

    def finish(self, prompt_tokens: int | None, completion_tokens: int) -> list[dict[str, Any]]:
        """The end of the answer: what was held back, the usage if asked, the summary on the very last chunk."""
        chunks, self._held = self._held, []
        if self.wants_usage:
            usage_chunk = self._frame([], None)
            usage_chunk["usage"] = usage_object(prompt_tokens, completion_tokens)
            chunks.append(usage_chunk)
        if not chunks:
            chunks.append(self._frame([], None))
        summary = {"peers": list(self.peers), "failovers": self.failovers, "resumes": self.resumes}
        sent = self._send(chunks)
        sent[-1][NOTE] = {**sent[-1].get(NOTE, {}), **summary}
        return sent


# --- a whole answer ---------------------------------------------------------------------------


def _whole_choice(value: Any, kind: Kind) -> dict[str, Any] | None:
    if not isinstance(value, dict):
        return None
    index = _int(value.get("index", 0), 0, MAX_CHOICES - 1)
    if index is None:
        return None
    choice: dict[str, Any] = {"index": index}
    if kind == "chat":
        raw = value.get("message")
        if not isinstance(raw, dict):
            return None
        message: dict[str, Any] = {"role": "assistant", "content": _text(raw.get("content"))}
        message["refusal"] = _text(raw.get("refusal"))
        if "tool_calls" in raw:
            calls = _tool_calls(raw["tool_calls"], streamed=False)
            if calls is None:
                return None
            message["tool_calls"] = calls
        choice["message"] = message
        choice["logprobs"] = _chat_logprobs(value.get("logprobs"))
    else:
        text = _text(value.get("text"))
        if text is None:
            return None
        choice["text"] = text
        choice["logprobs"] = _legacy_logprobs(value.get("logprobs"))
    choice["finish_reason"] = _finish_reason(value.get("finish_reason")) or "stop"
    return choice


def whole_answer(
    payload: Any, kind: Kind, *, model: str | None, request_id: str | None = None, created: int | None = None
) -> dict[str, Any] | None:
    """A non-streamed answer with only its known, checked keys and the gateway's id; None if it is not one.

    A peer that sends something else (no choices, a choice that does not check) has failed: the
    caller tries another peer rather than hand its client half an answer.
    """
    if not isinstance(payload, dict) or not isinstance(payload.get("choices"), list):
        return None
    raw = payload["choices"]
    if not raw or len(raw) > MAX_CHOICES:
        return None
    choices = [_whole_choice(value, kind) for value in raw]
    if any(choice is None for choice in choices):
        return None
    answer: dict[str, Any] = {
        "id": request_id or new_id(ID_PREFIXES[kind]),
        "object": WHOLE_OBJECTS[kind],
        "created": created if created is not None else int(time.time()),
        "model": model or _text(payload.get("model"), MAX_SHORT) or "unknown",
    }
    fingerprint = _text(payload.get("system_fingerprint"), MAX_SHORT)
    if fingerprint is not None:
        answer["system_fingerprint"] = fingerprint
    answer["choices"] = choices
    usage = payload.get("usage")
    if isinstance(usage, dict):
        prompt, completion = _int(usage.get("prompt_tokens")), _int(usage.get("completion_tokens"))
        if prompt is not None and completion is not None:
            answer["usage"] = usage_object(prompt, completion)
    return answer
