"""Schemathesis, driven by the worker's own OpenAPI schema, over the fake-engine app.

Valid and invalid bodies, headers and methods for every documented operation: no answer may be a 5xx
(other than the documented 503s), each must have a documented status and content type, and errors
must be in OpenAI's shape (the schema says so, and ``response_schema_conformance`` checks it).
Deterministic (derandomized, no example database) and a few seconds long.
"""

from __future__ import annotations

import time

import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.generation.modes import GenerationMode
from schemathesis.python.asgi import get_client
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from peerinfer.engine.fake import FakeEngine
from peerinfer.server.app import create_app
from tests.conftest import worker_settings

app = create_app(worker_settings(n_ctx=512, max_tokens_cap=64, max_body_bytes=65_536), FakeEngine(n_ctx=512))
schema = schemathesis.openapi.from_asgi("/openapi.json", app)
schema.config.generation.update(
    modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE], max_examples=50, deterministic=True, database="none"
)
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


def wait_until_ready() -> None:
    with get_client(app) as client:
        deadline = time.monotonic() + 30
        while client.get("/health").status_code != 200:
            assert time.monotonic() < deadline, "the fake engine did not load"
            time.sleep(0.01)


@schema.parametrize()
@settings(derandomize=True, database=None, deadline=None, suppress_health_check=list(HealthCheck))
def test_the_api_answers_fuzzed_requests_within_its_schema(case: schemathesis.Case) -> None:
    wait_until_ready()
    response = case.call()
    if response.status_code == 503:
        # A documented 503 (the queue is full) is an answer, not a crash: it carries the error shape.
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    case.validate_response(
        response, checks=[check for check in CHECKS if response.status_code != 503 or check is not not_a_server_error]
    )
