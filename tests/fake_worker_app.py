"""A fake-engine worker for ``python3 -m uvicorn tests.fake_worker_app:app --host 0.0.0.0 --port 8000``.

Configured like a real worker by ``PEERINFER_*``; it tells the story of ``tests.network_support``,
one token every ``PEERINFER_TEST_TOKEN_DELAY_S`` seconds (default 0), so a test can kill it
mid-answer. The NAT tests run it in network namespaces, started by the worker's own command.
"""

from __future__ import annotations

import os

from peerinfer.engine.fake import FakeEngine
from peerinfer.server.app import create_app
from peerinfer.settings import load_worker_settings
from tests.network_support import story_responder

_delay = float(os.environ.get("PEERINFER_TEST_TOKEN_DELAY_S", "0"))
app = create_app(load_worker_settings(), FakeEngine(story_responder, token_delay_s=_delay, slots=4, max_queue=8))
