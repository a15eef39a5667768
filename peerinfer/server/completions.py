"""``/v1/completions``: a raw prompt to a ``Job``, served once."""

from __future__ import annotations

from fastapi.responses import Response
from starlette.types import Receive

from peerinfer.api import openai as wire
from peerinfer.api.formats import CompletionFormat
from peerinfer.engine.prompt import PromptPart
from peerinfer.server.serving import Job, Serving, max_tokens


class CompletionServing:
    def __init__(self, core: Serving) -> None:
        self.core = core

    async def serve(self, request: wire.CompletionRequest, receive: Receive) -> Response:
        """The one serving path of a completion, streamed or whole."""
        job = await self.job(request)
        answer_format = CompletionFormat(
            model=self.core.model,
            fingerprint=self.core.fingerprint,
            choices=request.choices,
            include_usage=request.include_usage,
            logprobs=request.logprobs is not None,
            echo=request.prompt_text if request.echo else "",
        )
        return await self.core.respond(job, receive, bool(request.stream), answer_format)

    async def job(self, request: wire.CompletionRequest) -> Job:
        core = self.core
        limit = max_tokens(request.max_tokens, wire.COMPLETIONS_DEFAULT_MAX_TOKENS, core.settings.max_tokens_cap)
        grammar = await core.grammar(request.response_format)
        choices = core.sampling(request, limit=limit, stops=request.stops, grammar=grammar, logprobs=request.logprobs)
        text = request.prompt_text
        if request.parse_special:
            bos = core.engine.info.bos_token
            prompt: str | list[PromptPart] = [PromptPart(text, markup=True)]
            add_bos = not (bos and text.startswith(bos))  # a prompt that writes its own BOS gets one
        else:
            prompt, add_bos = text, True  # text only: see the README on raw prompts
        tokens = await core.reader.tokenize(prompt, add_bos, "prompt")
        return Job(tokens, choices)
