"""Identifiers. Plain strings on the wire; ``NewType`` keeps them apart in type checks."""

from __future__ import annotations

import uuid
from typing import NewType

RequestId = NewType("RequestId", str)
InstanceId = NewType("InstanceId", str)


def new_request_id() -> RequestId:
    return RequestId(f"req-{uuid.uuid4().hex[:16]}")


def new_instance_id(role: str, index: int) -> InstanceId:
    return InstanceId(f"{role}-{index}")
