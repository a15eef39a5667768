"""Chat formatting: the GGUF's template when it has one, a transcript for base models."""

from __future__ import annotations

import pytest

from peerinfer.engine.prompt import ChatTurn, render_chat
from peerinfer.errors import RequestError

# A ChatML-style template, as many GGUFs carry it (written here for the test).
CHATML = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
STRICT = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first message must be from the user') }}{% endif %}"


def test_base_model_gets_a_question_answer_transcript_with_a_turn_stop() -> None:
    prompt = render_chat([ChatTurn("system", "Be brief."), ChatTurn("user", "Capital of France?")], None)
    assert prompt.text == "Be brief.\n\nQuestion: Capital of France?\nAnswer:"
    assert "\nQuestion:" in prompt.stops
    assert prompt.add_bos


def test_transcript_keeps_earlier_turns() -> None:
    turns = [ChatTurn("user", "Hi"), ChatTurn("assistant", "Hello."), ChatTurn("user", "Bye")]
    assert render_chat(turns, None).text == "Question: Hi\nAnswer: Hello.\n\nQuestion: Bye\nAnswer:"


def test_transcript_continue_final_message_ends_inside_the_answer() -> None:
    turns = [ChatTurn("user", "Capital of France?"), ChatTurn("assistant", "The capital is")]
    assert render_chat(turns, None, continue_final=True).text.endswith("Answer: The capital is")


def test_template_is_rendered_with_generation_prompt_and_bos_not_doubled() -> None:
    prompt = render_chat([ChatTurn("user", "Hi")], CHATML, bos_token="<s>")
    assert prompt.text == "<s><|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert not prompt.add_bos
    assert prompt.stops == ("<|im_end|>", "<|im_start|>user")  # its end of a turn, if written as text


def test_template_continue_final_cuts_after_the_partial_answer() -> None:
    turns = [ChatTurn("user", "Hi"), ChatTurn("assistant", "Hello, I am")]
    prompt = render_chat(turns, CHATML, bos_token="<s>", continue_final=True)
    assert prompt.text.endswith("<|im_start|>assistant\nHello, I am")


def test_template_exceptions_become_request_errors() -> None:
    with pytest.raises(RequestError, match="first message must be from the user"):
        render_chat([ChatTurn("assistant", "x")], STRICT)


def test_continue_final_needs_an_assistant_message_last() -> None:
    with pytest.raises(RequestError, match="continue_final_message"):
        render_chat([ChatTurn("user", "x")], None, continue_final=True)
