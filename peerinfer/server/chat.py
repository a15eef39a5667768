"""``/v1/chat/completions``: a chat request to a ``Job`` (template, tokens, constraints), served once.

``ChatServing.job`` is also how the Responses API serves its requests: it writes the chat request
its body means and encodes the same outcomes in its own format.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from typing import Any

from fastapi.responses import Response
from starlette.types import Receive

from peerinfer.api import openai as wire
from peerinfer.api.formats import ChatFormat
from peerinfer.engine.chat_types import ToolCall
from peerinfer.engine.prompt import ChatPrompt, ChatTurn, render_chat
from peerinfer.engine.tool_calls import ToolCallParser, function_names, tool_call_grammar, tools_to_render
from peerinfer.errors import RequestError
from peerinfer.server.serving import Job, Serving, max_tokens


class ChatServing:
    def __init__(self, core: Serving) -> None:
        self.core = core

    async def serve(self, request: wire.ChatCompletionRequest, receive: Receive) -> Response:
        """The one serving path of a chat completion, streamed or whole."""
        job = await self.job(request)
        return await self.core.respond(job, receive, bool(request.stream), self.format(request))

    def format(self, request: wire.ChatCompletionRequest) -> ChatFormat:
        return ChatFormat(
            model=self.core.model,
            fingerprint=self.core.fingerprint,
            choices=request.choices,
            include_usage=request.include_usage,
            logprobs=request.logprobs_top is not None,
        )

    async def job(self, request: wire.ChatCompletionRequest) -> Job:
        """Checks, renders and tokenises ``request``; raises ``RequestError`` before anything is queued."""
        core = self.core
        info = core.engine.info
        cap = core.settings.max_tokens_cap
        param = "max_completion_tokens" if request.max_completion_tokens is not None else "max_tokens"
        limit = max_tokens(request.token_limit, cap, cap, param)
        tool_choice = _tool_choice(request)
        tools = tools_to_render(_tools(request), tool_choice)
        if tools and request.response_format is not None and request.response_format.type != "text":
            raise RequestError(
                "response_format constrains the answer to JSON, so the model could not call the tools; send "
                'one of response_format and tools (or tool_choice: "none")',
                param="response_format",
            )
        grammar = await core.grammar(request.response_format)
        turns = [_turn(message) for message in request.messages]

        def render() -> ChatPrompt:
            return render_chat(
                turns,
                info.chat_template,
                bos_token=info.bos_token,
                eos_token=info.eos_token,
                continue_final=request.continue_final_message,
                tools=tools,
            )

        prompt = await core.reader.render(turns, render)
        # Control tokens come from the template's markup only, never from a message's text.
        tokens = await core.reader.tokenize(prompt.parts, prompt.add_bos, "messages")
        reader = None
        if tools and prompt.tool_syntax is not None:
            syntax = prompt.tool_syntax
            grammar = tool_call_grammar(syntax, tools, tool_choice, core.engine.json_grammar)
            reader = partial(ToolCallParser, syntax, function_names(tools))
        choices = core.sampling(
            request, limit=limit, stops=request.stops + prompt.stops, grammar=grammar, logprobs=request.logprobs_top
        )
        return Job(tokens, choices, strip_leading_space=not request.continue_final_message, tool_calls=reader)


def _turn(message: wire.ChatMessage) -> ChatTurn:
    calls = tuple(ToolCall(call.id, call.function.name, call.function.arguments) for call in message.tool_calls or ())
    return ChatTurn(message.role, message.text, name=message.name, tool_calls=calls, tool_call_id=message.tool_call_id)


def _tools(request: wire.ChatCompletionRequest) -> list[Mapping[str, Any]] | None:
    return [tool.model_dump(exclude_none=True) for tool in request.tools] if request.tools else None


def _tool_choice(request: wire.ChatCompletionRequest) -> str | Mapping[str, Any] | None:
    choice = request.tool_choice
    return choice.model_dump() if isinstance(choice, wire.NamedToolChoice) else choice
