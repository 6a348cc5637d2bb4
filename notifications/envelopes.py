"""Typed bodies of the push API; anything unknown or malformed is refused here.

Guarded by tests/notifications/test_api.py.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

MAX_UID = 2**63 - 1
MAX_BODY_BYTES = 16 * 1024

Uid = Annotated[int, Field(ge=1, le=MAX_UID)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class _Body(_Strict):
    body: dict[str, Any]

    @field_validator("body")
    @classmethod
    def _small(cls, value: dict[str, Any]) -> dict[str, Any]:
        try:
            encoded = json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
        except ValueError:
            # Python's JSON reader takes NaN, Infinity and 1e400; no JSON column
            # stores them, and the database refusing would be a 503, not a 400.
            raise ValueError("body holds NaN or an infinite number, which JSON does not have") from None
        if len(encoded.encode()) > MAX_BODY_BYTES:
            raise ValueError(f"body is larger than {MAX_BODY_BYTES} bytes")
        return value


class _Targeted(_Body):
    uids: list[Uid] | None = None
    uid: Uid | None = None

    @model_validator(mode="after")
    def _targets(self) -> _Targeted:
        from django.conf import settings

        if (self.uids is None) == (self.uid is None):
            raise ValueError('give exactly one of "uids" (a list) or "uid"')
        if self.uids is not None and not self.uids:
            raise ValueError("uids must not be empty")
        if self.uids is not None and len(self.uids) > settings.PUSH_API_MAX_UIDS:
            raise ValueError(f"uids has more than {settings.PUSH_API_MAX_UIDS} entries")
        return self

    @property
    def targets(self) -> list[int]:
        """The distinct target uids, in request order."""
        return [self.uid] if self.uid is not None else list(dict.fromkeys(self.uids or []))


class UserMessage(_Targeted):
    from_uid: Annotated[int, Field(ge=0, le=MAX_UID)] = 0


class CommentMessage(_Targeted):
    from_uid: Uid


class SystemMessage(_Body):
    pass


def describe(error: ValidationError) -> str:
    """The first problem, naming the field."""
    first = error.errors()[0]
    loc = ".".join(str(part) for part in first["loc"])
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        message = "unknown field"
    elif first["type"] == "missing":
        message = "required"
    return f"{loc}: {message}" if loc else message
