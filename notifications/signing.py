"""HMAC request signatures of the push API (PROTOCOL.md section 2).

Signature = hex HMAC-SHA256 of ``"<timestamp>." + raw body`` with
PUSH_API_SECRET; the timestamp (unix seconds) may be at most
PUSH_API_MAX_SKEW seconds off. Both the server check and the client in
notifications/client.py use ``sign``.

Guarded by tests/notifications/test_api.py.
"""

from __future__ import annotations

import hashlib
import hmac
import time


def sign(secret: str, timestamp: str, body: bytes) -> str:
    return hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()


def signed_headers(secret: str, body: bytes, *, now: float | None = None) -> dict[str, str]:
    """The two headers that sign a request body."""
    timestamp = str(int(time.time() if now is None else now))
    return {"X-Push-Timestamp": timestamp, "X-Push-Signature": sign(secret, timestamp, body)}


def check_signature(
    *, secret: str, timestamp: str | None, signature: str | None, body: bytes, max_skew: int, now: float | None = None
) -> str | None:
    """None when the request is signed correctly, else what is wrong."""
    if not timestamp or not signature:
        return "missing X-Push-Timestamp or X-Push-Signature header"
    if not timestamp.isdigit() or len(timestamp) > 12:
        return "X-Push-Timestamp must be unix seconds"
    current = time.time() if now is None else now
    if abs(current - int(timestamp)) > max_skew:
        return f"X-Push-Timestamp is more than {max_skew} s off the server clock"
    expected = sign(secret, timestamp, body)
    if not hmac.compare_digest(expected, signature.strip().lower()):
        return "signature does not match"
    return None
