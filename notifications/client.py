"""A small client for the main site: signs and posts pushes to pushsite.

Standard library only, so the main site can use it without new dependencies::

    from notifications.client import PushClient
    client = PushClient("https://push.example.com", secret=os.environ["PUSH_API_SECRET"])
    client.user_message([176906], {"title": "Hello"})

Every method returns the decoded JSON answer; an error answer raises
``PushError`` carrying the HTTP status and the server's message.

Each push is sent with a fresh ``Idempotency-Key``. A timeout, a connection
error or a 503 is retried (``retries`` times, with jittered exponential
backoff), signed again under the same key: the server stores a push once
however many of the attempts reached it (PROTOCOL.md section 6).
"""

from __future__ import annotations

import json
import random
import ssl
import time
import urllib.error
import urllib.request
import uuid
from typing import Any

from .signing import signed_headers


class PushError(Exception):
    def __init__(self, status: int, msg: str) -> None:
        super().__init__(f"{status}: {msg}")
        self.status = status
        self.msg = msg


class PushClient:
    def __init__(
        self,
        base_url: str,
        *,
        secret: str,
        timeout: float = 5.0,
        ssl_context: ssl.SSLContext | None = None,
        retries: int = 3,
        backoff: float = 0.5,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.secret = secret
        self.timeout = timeout
        self.ssl_context = ssl_context  # e.g. one that trusts a private CA
        self.retries = retries
        self.backoff = backoff

    def user_message(self, uids: list[int], body: dict[str, Any], *, from_uid: int = 0) -> dict[str, Any]:
        """A personal notice (msg_type 7) to each uid."""
        return self._post("/api/notice/userMessage", {"uids": uids, "body": body, "from_uid": from_uid})

    def comment(self, uids: list[int], body: dict[str, Any], *, from_uid: int) -> dict[str, Any]:
        """A comment notification (msg_type 5) from from_uid to each uid."""
        return self._post("/api/comment/message", {"uids": uids, "from_uid": from_uid, "body": body})

    def system_message(self, body: dict[str, Any]) -> dict[str, Any]:
        """A system notice (msg_type 6) to every online user."""
        return self._post("/api/notice/systemMessage", {"body": body})

    def job(self, job_id: str) -> dict[str, Any]:
        """Progress of an accepted job."""
        return self._request("GET", f"/api/push/jobs/{job_id}", b"")

    def _post(self, path: str, payload: dict[str, Any], *, key: str | None = None) -> dict[str, Any]:
        # One body and one key for every attempt: a retry is the same push.
        data = json.dumps(payload, separators=(",", ":")).encode()
        key = key or uuid.uuid4().hex
        for attempt in range(self.retries + 1):
            try:
                return self._request("POST", path, data, key=key)
            except PushError as error:
                if error.status not in (0, 503) or attempt == self.retries:
                    raise
            # 0.5, 1, 2 s ... each stretched by up to half again, so that
            # clients that failed together do not retry together.
            time.sleep(self.backoff * 2**attempt * (1 + random.random() / 2))  # noqa: S311
        raise AssertionError("unreachable")  # pragma: no cover

    def _request(self, method: str, path: str, data: bytes, *, key: str | None = None) -> dict[str, Any]:
        headers = {"Content-Type": "application/json", **signed_headers(self.secret, data)}
        if key is not None:
            headers["Idempotency-Key"] = key
        request = urllib.request.Request(  # noqa: S310 - the URL is the operator's pushsite
            self.base_url + path, data=data if method == "POST" else None, headers=headers, method=method
        )
        try:
            with urllib.request.urlopen(  # noqa: S310
                request, timeout=self.timeout, context=self.ssl_context
            ) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as error:
            try:
                answer = json.loads(error.read())
                msg = answer.get("msg", error.reason)
            except ValueError:
                msg = str(error.reason)
            raise PushError(error.code, msg) from None
        except (urllib.error.URLError, TimeoutError) as error:
            raise PushError(0, f"pushsite unreachable: {error}") from None
