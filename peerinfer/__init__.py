"""peerinfer: a peer-to-peer network of CPU machines serving a quantized LLM.

The package is split by architecture:

- ``peerinfer.engine``: the inference engine (llama.cpp seam, fake engine, text assembly, prompts);
- ``peerinfer.api``: pure OpenAI wire formats and SSE framing;
- ``peerinfer.server``: the FastAPI worker;
- ``peerinfer.client``: the requests-based SDK and CLI.
"""

from __future__ import annotations

__version__ = "0.1.0"
