"""The AudioHook upgrade request's HTTP message signature, checked when a client secret is set.

Genesys signs the WebSocket upgrade with an HTTP Message Signature (RFC 9421, HMAC-SHA256,
`Signature-Input` / `Signature` headers) keyed by the integration's client secret. The rules
are those of the reference implementation's verifier (purecloudlabs/audiohook-reference-
implementation, app/src/authenticator.ts): the signature covers the request target, the
authority and the four AudioHook headers, its `keyid` is the `X-API-KEY`, it carries a nonce
of at least 22 characters, and it is at most 10 s old. The RFC itself (structured fields,
signature base, HMAC) is `http_message_signatures` (pyauth), a maintained RFC 9421
implementation, rather than a parser of our own. Nonces seen within the signature lifetime
are refused a second time (replays).
"""

from __future__ import annotations

import datetime
import time
from collections import OrderedDict
from dataclasses import dataclass

REQUIRED_COMPONENTS = (
    "@request-target",
    "@authority",
    "audiohook-organization-id",
    "audiohook-session-id",
    "audiohook-correlation-id",
    "x-api-key",
)
MAX_AGE_S = 10  # the reference server's maxSignatureAge
MIN_NONCE_CHARS = 22  # the reference server's shortest nonce
MAX_NONCES = 100_000  # replay memory: nonces of the last MAX_AGE_S (+ skew) seconds


class _Headers:
    """Header lines in wire order, repeated names kept (what the resolver iterates)."""

    def __init__(self, lines: list[tuple[str, str]]):
        self._lines = lines

    def items(self) -> list[tuple[str, str]]:
        return list(self._lines)


@dataclass
class _UpgradeRequest:
    """The request interface `http_message_signatures` resolves components from."""

    method: str
    url: str
    headers: _Headers
    request_target: str  # @request-target as sent, not rebuilt from the URL


class SignatureVerifier:
    """Verifies upgrade requests against one client secret; remembers recent nonces."""

    def __init__(self, secret: bytes):
        from http_message_signatures import HTTPMessageVerifier, HTTPSignatureKeyResolver
        from http_message_signatures.algorithms import HMAC_SHA256

        self.secret = secret
        self._nonces: OrderedDict[str, float] = OrderedDict()

        verifier_self = self

        class _Keys(HTTPSignatureKeyResolver):
            def resolve_public_key(self, key_id: str):
                return verifier_self.secret

        self._verifier = HTTPMessageVerifier(signature_algorithm=HMAC_SHA256, key_resolver=_Keys())

    def verify(self, headers: list[tuple[str, str]], request_target: str) -> str | None:
        """None when the request is signed as AudioHook requires, else the reason.

        `headers`: every header line (lower-case names); `request_target`: path and query as
        sent on the request line."""
        from http_message_signatures.exceptions import HTTPMessageSignaturesException

        fields = dict(headers)
        api_key = fields.get("x-api-key", "").strip()
        if not api_key:
            return 'missing "X-API-KEY" header'
        if "signature-input" not in fields and "signature" not in fields:
            return "unsigned request (a client secret is configured)"
        host = fields.get("host", "")
        # @authority is the Host header, as the reference verifier takes it.
        url = f"http://{host}{request_target}"
        request = _UpgradeRequest("GET", url, _Headers(headers), request_target)
        try:
            results = self._verifier.verify(
                request,
                max_age=datetime.timedelta(seconds=MAX_AGE_S),
                require_components=REQUIRED_COMPONENTS,
            )
        except HTTPMessageSignaturesException as exc:
            return f"signature: {exc}"
        except (ValueError, TypeError, UnicodeError) as exc:
            return f"signature: malformed ({exc})"
        params = results[0].parameters
        if params.get("keyid") != api_key:
            return "X-API-KEY header and signature keyid mismatch"
        nonce = params.get("nonce")
        if not isinstance(nonce, str) or len(nonce) < MIN_NONCE_CHARS:
            return f'signature "nonce" missing or shorter than {MIN_NONCE_CHARS} characters'
        if not self._remember(nonce):
            return "signature replayed (nonce seen before)"
        return None

    def _remember(self, nonce: str) -> bool:
        now = time.monotonic()
        while self._nonces and next(iter(self._nonces.values())) < now:
            self._nonces.popitem(last=False)
        if nonce in self._nonces:
            return False
        if len(self._nonces) >= MAX_NONCES:
            self._nonces.popitem(last=False)
        self._nonces[nonce] = now + MAX_AGE_S + self._verifier.max_clock_skew.total_seconds()
        return True


_verifiers: dict[bytes, SignatureVerifier] = {}


def verify_upgrade(secret: bytes, headers, scope: dict) -> str | None:
    """The problem with the upgrade's signature (None: it verifies), with one verifier per
    secret for the process, so nonces are remembered across sessions."""
    if secret not in _verifiers:
        _verifiers[secret] = SignatureVerifier(secret)
    lines = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in headers.raw]
    return _verifiers[secret].verify(lines, _request_target(scope))


def _request_target(scope: dict) -> str:
    path = scope.get("raw_path") or scope.get("path", "/").encode()
    query = scope.get("query_string") or b""
    target = path.decode("latin-1")
    return f"{target}?{query.decode('latin-1')}" if query else target
