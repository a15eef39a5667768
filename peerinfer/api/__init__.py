"""Pure OpenAI wire formats and SSE framing: no I/O, testable without a server."""
