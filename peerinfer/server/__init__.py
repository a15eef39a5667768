"""The FastAPI worker: app factory, OpenAI routes, health and error mapping."""
