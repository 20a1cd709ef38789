"""Where a request's KV is, in typed form, and how that travels inside vLLM.

``KVHandle`` is what the front door carries from the prefill worker's ``PrefillResult`` (or a migration's
``Handover``) to the decode worker's ``DecodeRequest``: the transfers ("parts") the prompt's KV landed in on
the decode worker, in token order. vLLM itself carries per-request KV settings as a plain dict
(``SamplingParams.extra_args["kv_transfer_params"]`` → ``Request.kv_transfer_params``), copied into its
engine-core and worker processes; ``SaveParams`` (prefill side) and ``LoadParams`` (decode side) are the only
code that writes or reads pdflow's keys in that dict. Importing this module imports nothing else of pdflow
but the KV settings.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from protocol.kv_config import KVCodecKind

# Keys in vLLM's kv_transfer_params dict, private to this module.
_DESTINATION = "pdflow_destination"  # save: side-channel address of the decode worker receiving the KV
_TRANSFER_ID = "pdflow_transfer_id"  # save: the transfer the KV travels in; load: the last part's id
_CODEC = "pdflow_codec"  # save, optional: a codec for this transfer only
_REMOTE_TOKENS = "pdflow_remote_tokens"  # load: prompt tokens whose KV comes from the parts
_PARTS = "pdflow_parts"  # load, migrated KV only: [transfer id, first block] pairs in token order
_BLOCK_FORMAT = "pdflow_block_format"  # load, optional: the parts are raw block images of this layout
_IN_FLIGHT = "pdflow_in_flight"  # load, optional: parts still on their way at the hand-over
_KEEP = "pdflow_keep"  # load, optional: leave the parts landed once loaded (priming)


def handoff_transfer_id(request_id: str) -> str:
    """The transfer id of a request's prefill-to-decode hand-off."""
    return f"{request_id}/handoff"


@dataclass(frozen=True, slots=True)
class KVPart:
    """One transfer holding a run of the request's KV blocks, from block ``first_block`` on."""

    transfer_id: str
    first_block: int = 0


@dataclass(frozen=True, slots=True)
class KVHandle:
    """Where a decode worker loads a request's KV from.

    pdflow's connector: ``parts`` landed (or, ``in_flight``, are landing) in the decode worker's staging
    arena; a prefill hand-off is one part from block 0, a live migration one part per stage. ``block_format``
    says the parts are raw block images of that layout (``kv_transfer.vllm.paged.block_format``), which the
    receiver checks against its own. vLLM's NixlConnector (the baseline): ``nixl`` holds that connector's own
    parameters, which the decode engine passes back to it as they are."""

    parts: tuple[KVPart, ...] = ()
    block_format: str = ""
    in_flight: frozenset[str] = frozenset()
    migrated: bool = False  # the parts come from a live migration (a failed load is recomputed, not failed)
    nixl: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.nixl is None and not self.parts:
            raise ValueError("a KV handle names at least one part, or is the NixlConnector's")
        unknown = self.in_flight - {p.transfer_id for p in self.parts}
        if unknown:
            raise ValueError(f"parts in flight that the handle does not name: {sorted(unknown)}")
        if not self.migrated and (
            len(self.parts) > 1 or self.in_flight or any(p.first_block for p in self.parts)
        ):
            # only a migration's KV travels in several parts, or with one still on its way
            raise ValueError(f"a hand-off's KV is one part from block 0, landed: {self}")

    @classmethod
    def handoff(cls, transfer_id: str, block_format: str = "") -> KVHandle:
        return cls((KVPart(transfer_id),), block_format)

    @property
    def transfer_ids(self) -> tuple[str, ...]:
        return tuple(p.transfer_id for p in self.parts)


@dataclass(frozen=True, slots=True)
class SaveParams:
    """Prefill side: push the prompt's KV to ``destination`` (a decode worker's side-channel address) as
    transfer ``transfer_id``, with ``codec`` if set (else the worker's policy decides)."""

    transfer_id: str
    destination: str
    codec: KVCodecKind | None = None

    def to_params(self) -> dict[str, Any]:
        params: dict[str, Any] = {_DESTINATION: self.destination, _TRANSFER_ID: self.transfer_id}
        if self.codec is not None:
            params[_CODEC] = self.codec.value
        return params

    @classmethod
    def from_params(cls, params: Mapping[str, Any] | None) -> SaveParams | None:
        """The save request in a request's params, or None if it asks for none."""
        if not params or not params.get(_DESTINATION) or _TRANSFER_ID not in params:
            return None
        codec = params.get(_CODEC)
        return cls(
            str(params[_TRANSFER_ID]), str(params[_DESTINATION]), KVCodecKind(codec) if codec else None
        )


@dataclass(frozen=True, slots=True)
class LoadParams:
    """Decode side: load the KV of the first ``remote_tokens`` tokens from ``handle``'s parts; ``keep`` leaves
    the parts landed once loaded (a request that primes the prefix cache for the request it precedes)."""

    handle: KVHandle
    remote_tokens: int
    keep: bool = False

    def to_params(self) -> dict[str, Any]:
        handle = self.handle
        if handle.nixl is not None:  # vLLM's NixlConnector reads its own keys, and pdflow's token count
            nixl = {"do_remote_prefill": True, "do_remote_decode": False, _REMOTE_TOKENS: self.remote_tokens}
            return {**handle.nixl, **nixl}
        params: dict[str, Any] = {
            _TRANSFER_ID: handle.parts[-1].transfer_id,
            _REMOTE_TOKENS: self.remote_tokens,
        }
        if handle.migrated:
            params[_PARTS] = [[p.transfer_id, p.first_block] for p in handle.parts]
        if handle.block_format:
            params[_BLOCK_FORMAT] = handle.block_format
        if handle.in_flight:
            params[_IN_FLIGHT] = sorted(handle.in_flight)
        if self.keep:
            params[_KEEP] = True
        return params

    @classmethod
    def from_params(cls, params: Mapping[str, Any] | None) -> LoadParams | None:
        """The load request in a request's params (pdflow's connector), or None if it asks for none.
        ValueError if the keys are there but malformed."""
        if (
            not params
            or _TRANSFER_ID not in params
            or _REMOTE_TOKENS not in params
            or params.get(_DESTINATION)
        ):
            return None
        try:
            if _PARTS in params:
                parts = tuple(KVPart(str(tid), int(first)) for tid, first in params[_PARTS])
            else:
                parts = (KVPart(str(params[_TRANSFER_ID])),)
            handle = KVHandle(
                parts,
                str(params.get(_BLOCK_FORMAT, "")),
                frozenset(str(t) for t in params.get(_IN_FLIGHT, ())),
                migrated=_PARTS in params,
            )
            return cls(handle, int(params[_REMOTE_TOKENS]), bool(params.get(_KEEP)))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"malformed pdflow KV transfer params {dict(params)!r}: {exc}") from exc

    @staticmethod
    def remote_tokens_of(params: Mapping[str, Any] | None) -> int | None:
        """The tokens a request asks vLLM's NixlConnector (the baseline) to load, if it asks."""
        if not params or not params.get("do_remote_prefill") or _REMOTE_TOKENS not in params:
            return None
        return int(params[_REMOTE_TOKENS])

    @staticmethod
    def loaded(params: dict[str, Any]) -> None:
        """Mark a request's params as loaded: asked again (vLLM preempted the request and schedules it
        afresh), the request recomputes its KV, since the parts are gone by then."""
        params.pop(_REMOTE_TOKENS, None)
