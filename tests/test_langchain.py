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


def test_langchain_structured_output_is_parsed_and_bind_tools_is_refused_loudly(real_worker: str) -> None:
    """``with_structured_output`` gets JSON that matches its schema; tools on a model whose chat format
    cannot write them are an error, never an answer that silently holds no tool calls."""
    import openai
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel

    class Capital(BaseModel):
        city: str
        country: str

    chat = ChatOpenAI(base_url=real_worker + "/v1", api_key="unused", model="gemma", temperature=0, max_tokens=40)
    answer = chat.with_structured_output(Capital, method="json_schema").invoke("What is the capital of France?")
    assert isinstance(answer, Capital)
    assert answer.city.strip() and answer.country.strip()

    @tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        return "sunny"

    with pytest.raises(openai.BadRequestError, match="cannot express tools"):
        chat.bind_tools([get_weather]).invoke("What is the weather in Paris?")
