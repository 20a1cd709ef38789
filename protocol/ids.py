"""Identifiers. Plain strings on the wire; ``NewType`` keeps them apart in type checks."""

from __future__ import annotations

import re
import uuid
from typing import NewType

RequestId = NewType("RequestId", str)
InstanceId = NewType("InstanceId", str)


MAX_REQUEST_ID = 128
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]+")


def new_request_id() -> RequestId:
    return RequestId(f"req-{uuid.uuid4().hex[:16]}")


def check_request_id(value: str) -> str | None:
    """Why a client-chosen request id cannot be used (it names transfers, log lines and the request log),
    or None if it can."""
    if len(value) > MAX_REQUEST_ID:
        return f"request_id is {len(value)} characters long; at most {MAX_REQUEST_ID} are accepted"
    if not _REQUEST_ID.fullmatch(value):
        return "request_id may hold only letters, digits and . _ : - (it names transfers and log lines)"
    return None


def new_instance_id(role: str, index: int) -> InstanceId:
    return InstanceId(f"{role}-{index}")
