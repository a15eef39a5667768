"""The worker: ``python3 -m uvicorn worker:app --host 127.0.0.1 --port 8000``."""

from peerinfer.server.app import create_app

app = create_app()
