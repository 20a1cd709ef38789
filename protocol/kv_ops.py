"""The KV side channel's operations, typed: what one worker's KV endpoint asks another's (or its own engine
asks it), and the reply to each. On the wire each is a JSON object with ``op`` naming it; ``parse_op``
checks an incoming one and ``parse_reply`` the answer, so a malformed message is a ``ValueError`` that the
side channel turns into a refusal, never a ``KeyError`` deep in a handler.

Transfers (sender → receiver): ``Reserve`` room for a transfer, ``Commit`` it once every layer is written
(or read), ``Abort`` it. Pulls (sender → receiver, which reads the sender's blocks): ``Pull``,
``PullStatus``. Migration pushes (a decode worker's engine host → its own connector): ``Push``,
``PushStatus``.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar, cast

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Reserve:
    """Reserve ``nbytes`` in the receiver's staging arena for ``transfer_id``. ``peer`` describes the
    sender's transport (``kv_transfer.exchange.wire.peer_to_wire``); ``notes``: the sender's layers come
    with a notification each (compressed layers, decoded as they land)."""

    OP: ClassVar[str] = "reserve"
    transfer_id: str
    request_id: str
    nbytes: int
    peer: dict[str, Any]
    notes: bool = True


@dataclass(frozen=True, slots=True)
class Reserved:
    offset: int  # of the region in the receiver's staging buffer
    peer: dict[str, Any]  # the receiver's transport


@dataclass(frozen=True, slots=True)
class Commit:
    """Every layer is in: check sizes and checksums (``manifest``: tokens, slots, the sender's record) and
    keep the transfer for its load."""

    OP: ClassVar[str] = "commit"
    transfer_id: str
    manifest: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Committed:
    bad: list[int] = field(default_factory=list)  # slots whose checksum failed: send them again


@dataclass(frozen=True, slots=True)
class Abort:
    """Free the transfer on the receiving side (stop a pull first); idempotent."""

    OP: ClassVar[str] = "abort"
    transfer_id: str
    why: str = "aborted by the sender"


@dataclass(frozen=True, slots=True)
class Done:
    """The reply of an operation that returns nothing but its success."""


@dataclass(frozen=True, slots=True)
class Pull:
    """Read ``slots`` (each a list of ``[remote address, offset in the receiver's buffer, bytes]``) from peer
    ``peer`` into the reservation of ``transfer_id``, one slot after another at ``rate`` bytes a second at
    most (None: at once)."""

    OP: ClassVar[str] = "pull"
    transfer_id: str
    peer: str
    slots: list[list[list[int]]]
    rate: float | None = None


@dataclass(frozen=True, slots=True)
class PullStatus:
    OP: ClassVar[str] = "pull_status"
    transfer_id: str


@dataclass(frozen=True, slots=True)
class PullState:
    done: bool


@dataclass(frozen=True, slots=True)
class Push:
    """Push blocks ``[first_block, end_block)`` of running request ``request_id`` to ``destination`` as
    transfer ``transfer_id``; ``expected`` is the block table earlier stages pushed from; ``background``: a
    paced pre-copy stage, not the last push."""

    OP: ClassVar[str] = "push"
    request_id: str
    transfer_id: str
    destination: str
    first_block: int
    end_block: int
    expected: list[int]
    background: bool = False


@dataclass(frozen=True, slots=True)
class PushStarted:
    """The push runs (``error`` empty): ``block_ids`` are the request's blocks up to ``end_block``, and a
    paced push ends no sooner than ``eta_s`` from now. Or it could not start (``error``)."""

    block_ids: list[int] = field(default_factory=list)
    eta_s: float = 0.0
    error: str = ""


@dataclass(frozen=True, slots=True)
class PushStatus:
    OP: ClassVar[str] = "push_status"
    transfer_id: str


@dataclass(frozen=True, slots=True)
class PushState:
    record: dict[str, Any] | None = None  # the push's TransferRecord as a dict once it ended; None: running


Op = Reserve | Commit | Abort | Pull | PullStatus | Push | PushStatus
OPS: dict[str, type[Any]] = {
    cls.OP: cls for cls in (Reserve, Commit, Abort, Pull, PullStatus, Push, PushStatus)
}
REPLIES: dict[type[Any], type[Any]] = {
    Reserve: Reserved,
    Commit: Committed,
    Abort: Done,
    Pull: Done,
    PullStatus: PullState,
    Push: PushStarted,
    PushStatus: PushState,
}


def op_to_wire(op: Op) -> dict[str, Any]:
    return {"op": op.OP, **dataclasses.asdict(op)}


def reply_to_wire(reply: Any) -> dict[str, Any]:
    return dataclasses.asdict(reply)


def parse_op(data: dict[str, Any]) -> Op:
    """The operation ``data`` names, checked; ValueError (a refusal) when it is unknown or malformed."""
    name = data.get("op")
    cls = OPS.get(str(name))
    if cls is None:
        raise ValueError(f"unknown side-channel op {name!r}")
    return cast(Op, _build(cls, data))


def parse_reply(op: type[Any] | Op, data: dict[str, Any]) -> Any:
    """The reply to ``op`` (an operation or its class) in ``data``, checked."""
    return _build(REPLIES[op if isinstance(op, type) else type(op)], data)


def _build(cls: type[T], data: dict[str, Any]) -> T:
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ValueError(f"{getattr(cls, 'OP', cls.__name__)}: field {f.name!r} is missing")
            continue
        values[f.name] = _check(cls, f.name, hints[f.name], data[f.name])
    return cls(**values)


def _check(cls: type[Any], name: str, hint: Any, value: Any) -> Any:
    """``value`` if it is what field ``name`` of type ``hint`` holds (an int is a float too; nothing else is
    converted); ValueError otherwise."""
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    for option in options:
        if option is type(None) and value is None:
            return value
        if option is bool and isinstance(value, bool):
            return value
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if option is float and isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if option is str and isinstance(value, str):
            return value
        origin = typing.get_origin(option) or option
        if origin in (list, dict) and isinstance(value, origin):
            return value
    raise ValueError(f"{getattr(cls, 'OP', cls.__name__)}: field {name!r} must be {hint}, not {value!r}")
