"""The gateway's API key: one check for every route, HTTP (uploads, subscriptions) and
live sockets (passed to the live tier as `LiveServices.key_problem`)."""

from __future__ import annotations

import hmac
from collections.abc import Mapping

from e2v.client.gateway.errors import UNAUTHORIZED, GatewayError


def key_problem(
    key: bytes | None, headers: Mapping[str, str], fallback: str | None = None
) -> str | None:
    """None when no key is configured or the request carries it, else "missing" or
    "wrong". The key is `X-API-Key: KEY`, else `Authorization: Bearer KEY`, else
    `fallback` (where headers cannot be set); compared in constant time."""
    if key is None:
        return None
    supplied = headers.get("x-api-key")
    scheme, _, token = headers.get("authorization", "").partition(" ")
    if supplied is None and scheme.lower() == "bearer":
        supplied = token.strip()
    if supplied is None:
        supplied = fallback
    if not supplied:
        return "missing"
    if not hmac.compare_digest(supplied.encode("utf-8", "surrogateescape"), key):
        return "wrong"
    return None


def check_key(request, key: bytes | None) -> None:
    """401 unless the request carries the configured key (`Authorization: Bearer KEY` or
    `X-API-Key: KEY`)."""
    problem = key_problem(key, request.headers)
    if problem == "missing":
        raise GatewayError(401, UNAUTHORIZED, "API key required (Authorization: Bearer KEY)")
    if problem == "wrong":
        raise GatewayError(401, UNAUTHORIZED, "wrong API key")
