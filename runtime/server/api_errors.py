"""OpenAI-style errors: every 4xx and 5xx the server answers is ``{"error": {...}}``."""

from __future__ import annotations

from collections.abc import Collection, Mapping

from starlette.responses import JSONResponse

from runtime.errors import MemoryRuntimeError

#: What a 503 (a full queue, storage that is away) asks the client to wait, in seconds.
RETRY_AFTER_S = 1

_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    404: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    503: "server_error",
}


class APIError(MemoryRuntimeError):
    """An HTTP error in the OpenAI format; ``param`` names the offending field."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    def body(self) -> dict[str, object]:
        """The JSON body OpenAI clients parse."""
        return {
            "error": {
                "message": self.message,
                "type": _TYPES.get(
                    self.status, "server_error" if self.status >= 500 else "invalid_request_error"
                ),
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> JSONResponse:
        """This error as a response."""
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad_request(param: str, message: str, code: str | None = None) -> APIError:
    """A 400 naming ``param`` (the message starts with it)."""
    return APIError(400, f"{param}: {message}", param=param, code=code)


def not_found(what: str) -> APIError:
    """A 404."""
    return APIError(404, f"{what} not found", code="not_found")


def known_fields(body: Mapping[str, object], fields: Collection[str]) -> None:
    """A 400 naming the first field of ``body`` not in ``fields``: a typo (``"sesion"``) must
    not be dropped silently, storing a memory under no session."""
    for name in body:
        if name not in fields:
            raise bad_request(name, "unknown field")
