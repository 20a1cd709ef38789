"""Where a request's KV is, through vLLM's per-request params: a hand-off's and a migration's handles come
back exactly as the engine host wrote them, and a handle that cannot be meant is refused."""

from __future__ import annotations

import pytest

from protocol.kv_config import KVCodecKind
from protocol.kv_handle import KVHandle, KVPart, LoadParams, SaveParams, handoff_transfer_id

HANDLES = [
    KVHandle.handoff("r/handoff"),
    KVHandle.handoff("r/handoff", "cpu-whole/128x3x64/torch.bfloat16/tt"),
    KVHandle((KVPart("r/m1/0", 0), KVPart("r/m1/1", 8)), "fmt", migrated=True),
    KVHandle((KVPart("r/m1/0", 0), KVPart("r/m1/1", 8)), "fmt", frozenset({"r/m1/1"}), migrated=True),
    KVHandle((KVPart("r/m2/0", 0),), migrated=True),
]


@pytest.mark.parametrize("handle", HANDLES)
@pytest.mark.parametrize("keep", [False, True])
def test_a_load_comes_back_as_the_engine_host_wrote_it(handle: KVHandle, keep: bool) -> None:
    load = LoadParams(handle, 330, keep)
    assert LoadParams.from_params(load.to_params()) == load


def test_a_save_comes_back_as_written_and_a_load_is_not_a_save() -> None:
    save = SaveParams(handoff_transfer_id("r"), "127.0.0.1:5555", KVCodecKind.INT8)
    assert SaveParams.from_params(save.to_params()) == save
    assert LoadParams.from_params(save.to_params()) is None
    assert SaveParams.from_params(LoadParams(HANDLES[0], 4).to_params()) is None


def test_once_loaded_the_params_ask_for_nothing_more() -> None:
    params = LoadParams(HANDLES[2], 64).to_params()
    LoadParams.loaded(params)
    assert LoadParams.from_params(params) is None  # preempted and scheduled again: it recomputes


@pytest.mark.parametrize(
    "make",
    [
        lambda: KVHandle(()),
        lambda: KVHandle((KVPart("a", 0), KVPart("b", 4))),  # several parts: only a migration's
        lambda: KVHandle((KVPart("a", 2),)),  # a hand-off starts at block 0
        lambda: KVHandle((KVPart("a", 0),), in_flight=frozenset({"a"})),  # a hand-off has landed
        lambda: KVHandle((KVPart("a", 0),), in_flight=frozenset({"z"}), migrated=True),  # names no part
    ],
)
def test_a_handle_that_cannot_be_meant_is_refused(make) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError):
        make()


def test_malformed_params_are_a_clear_error() -> None:
    params = LoadParams(HANDLES[2], 64).to_params()
    params["pdflow_parts"] = [["r/m1/0"]]  # a part without its first block
    with pytest.raises(ValueError, match="malformed pdflow KV transfer params"):
        LoadParams.from_params(params)
