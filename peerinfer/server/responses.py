"""``/v1/responses``: a Responses request served as the chat completion it means, in its own format.

The request is checked (``parse_responses_request``, by the route, before the model is needed), written
as its chat body, read by the chat request model and prepared by ``ChatServing.job`` (template,
tokens, grammar, sampling), then served once by the core with ``ResponsesFormat``. A 400 from the
chat path names the field this client sent (``max_output_tokens``, ``text.format``, ``input.2``), not
the chat field it became.
"""

from __future__ import annotations

import anyio
from fastapi.responses import Response
from starlette.types import Receive

from peerinfer.api import openai as wire
from peerinfer.api.responses import ResponsesRequest, responses_error, to_chat_body
from peerinfer.api.responses_output import ResponsesFormat
from peerinfer.errors import RequestError
from peerinfer.server.chat import ChatServing

INLINE_ITEMS = 64  # as many chat messages as the chat path renders on the loop


class ResponsesServing:
    def __init__(self, chat: ChatServing) -> None:
        self.chat = chat

    async def serve(self, request: ResponsesRequest, receive: Receive) -> Response:
        """The one serving path of a Response, streamed or whole."""

        def translate() -> wire.ChatCompletionRequest:
            return wire.parse_request(wire.ChatCompletionRequest, wire.dumps(to_chat_body(request)).encode("utf-8"))

        try:
            # A body of thousands of items takes a while to read again as chat: not on the loop.
            many = isinstance(request.input, list) and len(request.input) > INLINE_ITEMS
            chat_request = await anyio.to_thread.run_sync(translate) if many else translate()
            job = await self.chat.job(chat_request)
        except RequestError as exc:
            raise responses_error(exc, request) from exc
        answer_format = ResponsesFormat(request, model=self.chat.core.model)
        return await self.chat.core.respond(job, receive, bool(request.stream), answer_format)
