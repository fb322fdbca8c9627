"""``python -m runtime serve``: an OpenAI-compatible HTTP server over one :class:`Runtime`.

Starlette on uvicorn, sse-starlette for streams, prometheus-client for ``/metrics`` (the
stack of llama-cpp-python's server, without FastAPI/pydantic: every field is checked here,
and errors name it in the OpenAI error format).

Sessions: an ``X-Session-Id`` header or a ``session_id`` body field names one; the server
then holds the conversation (see :mod:`runtime.server.chat_request`). Without one, the request is
stateless. Every call into the runtime goes through one bounded queue, fair between
sessions (:mod:`runtime.server.scheduler`).
"""

from runtime.server.app import create_app, serve

__all__ = ["create_app", "serve"]
