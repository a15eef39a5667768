"""The gateway: one OpenAI-compatible door into the network (``python -m peerinfer gateway``)."""
