"""The gateway's API key: one check for every HTTP route (uploads, subscriptions)."""

from __future__ import annotations

import hmac

from e2v.client.gateway.errors import UNAUTHORIZED, GatewayError


def check_key(request, key: bytes | None) -> None:
    """401 unless the request carries the configured key (`Authorization: Bearer KEY` or
    `X-API-Key: KEY`), compared in constant time."""
    if key is None:
        return
    supplied = request.headers.get("x-api-key")
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if supplied is None and scheme.lower() == "bearer":
        supplied = token.strip()
    if not supplied:
        raise GatewayError(401, UNAUTHORIZED, "API key required (Authorization: Bearer KEY)")
    if not hmac.compare_digest(supplied.encode("utf-8", "surrogateescape"), key):
        raise GatewayError(401, UNAUTHORIZED, "wrong API key")
