"""LangChain's ChatOpenAI works against a worker unchanged (real model, real HTTP)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.real


def test_langchain_chat_openai_invoke_and_stream(real_worker: str) -> None:
    from langchain_openai import ChatOpenAI

    chat = ChatOpenAI(base_url=real_worker + "/v1", api_key="unused", model="gemma", temperature=0, max_tokens=20)
    answer = chat.invoke("What is the capital of France?")
    assert "Paris" in str(answer.content)
    streamed = "".join(str(chunk.content) for chunk in chat.stream("What is the capital of France?"))
    assert streamed == answer.content
