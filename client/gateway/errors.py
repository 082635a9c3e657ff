"""Every refusal as one JSON body, `{"error": ..., "error_kind": ...}`, with its HTTP status."""

from __future__ import annotations

# The client's per-file kinds (client/audio.py, client/classify.py) and their statuses.
# Unusable audio is the sender's problem (422); a failing Triton is ours (502/503).
FILE_ERROR_STATUS = {
    "decode": 422,
    "no_audio": 422,
    "empty": 422,
    "non_finite": 422,
    "out_of_range": 422,
    "too_short": 422,
    "too_long": 422,
    "channels": 422,  # ?channels=split: more channels than party names
    "inference": 502,  # Triton rejected the padded request the gateway built
    "server": 502,  # Triton failed on it (after retries)
    "internal": 500,  # a bug in the gateway
}

# The gateway's own kinds: the request, not the audio, is the problem.
BAD_REQUEST = "bad_request"  # 400: malformed body or multipart
BAD_PARAMETER = "bad_parameter"  # 400: a query value out of range
UNAUTHORIZED = "unauthorized"  # 401
NOT_FOUND = "not_found"  # 404 (no such endpoint)
METHOD_NOT_ALLOWED = "method_not_allowed"  # 405
READ_TIMEOUT = "read_timeout"  # 408: the body arrived too slowly
TOO_LARGE = "too_large"  # 413
UNSUPPORTED_MEDIA = "unsupported_media"  # 415
BUSY = "busy"  # 429: every slot and the queue are taken
UNAVAILABLE = "unavailable"  # 503: Triton unreachable or its model not ready

# Seconds a client should wait before retrying, by kind.
RETRY_AFTER_S = {BUSY: 1, UNAVAILABLE: 5}


class GatewayError(Exception):
    """A refused request: `status`, machine-readable `kind`, one-line `message`."""

    def __init__(self, status: int, kind: str, message: str):
        super().__init__(message)
        self.status, self.kind, self.message = status, kind, message

    def body(self) -> dict:
        return {"error": self.message, "error_kind": self.kind}

    def headers(self) -> dict[str, str]:
        retry = RETRY_AFTER_S.get(self.kind)
        headers = {"Retry-After": str(retry)} if retry else {}
        if self.status == 401:
            headers["WWW-Authenticate"] = 'Bearer realm="e2v-gateway"'
        return headers


def file_status(kind: str | None) -> int:
    """HTTP status of a file's outcome (its error row's kind, None when it succeeded)."""
    return 200 if kind is None else FILE_ERROR_STATUS.get(kind, 500)
