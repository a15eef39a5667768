"""The worker: ``python3 -m uvicorn worker:app --host 127.0.0.1 --port 8000``."""

from peerinfer.server.app import app_from_environment

app = app_from_environment()
