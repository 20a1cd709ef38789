"""The scheduler half of ``PdflowConnector`` as vLLM's scheduler drives it (imports vLLM; no engine)."""

from __future__ import annotations

from types import SimpleNamespace

from protocol.kv_handle import KVHandle, KVPart, LoadParams


def _load(
    *parts: tuple[str, int], tokens: int, in_flight: tuple[str, ...] = (), keep: bool = False
) -> dict[str, object]:
    """The params the engine host gives a decode request: a hand-off's one part, or a migration's parts."""
    if len(parts) == 1 and parts[0][0].endswith("/handoff"):
        handle = KVHandle.handoff(parts[0][0])
    else:
        handle = KVHandle(tuple(KVPart(*p) for p in parts), in_flight=frozenset(in_flight), migrated=True)
    return LoadParams(handle, tokens, keep).to_params()


def _scheduler_half():  # type: ignore[no-untyped-def]
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

    from kv_transfer.vllm.connector import PdflowConnector

    config = SimpleNamespace(kv_transfer_config=SimpleNamespace(kv_connector_extra_config={}, engine_id="d0"))
    return PdflowConnector(config, KVConnectorRole.SCHEDULER, None)  # type: ignore[arg-type]


class _Blocks:
    def __init__(self, ids: list[int]) -> None:
        self._ids = ids

    def get_block_ids(self) -> tuple[list[int]]:
        return (self._ids,)


def test_a_request_preempted_after_its_load_recomputes_instead_of_waiting_for_the_gone_transfer() -> None:
    connector = _scheduler_half()
    params = _load(("r1/handoff", 0), tokens=40)
    request = SimpleNamespace(request_id="r1", kv_transfer_params=params, num_prompt_tokens=41)
    assert connector.get_num_new_matched_tokens(request, 0) == (40, False)  # landed: loaded in its step
    connector.update_state_after_alloc(request, _Blocks([0, 1, 2]), 40)
    meta = connector.build_connector_meta(SimpleNamespace(num_scheduled_tokens={}))
    assert list(meta.loads) == ["r1"] and meta.loads["r1"].block_ids == [0, 1, 2]
    # vLLM preempts it (its computed tokens back to 0) and schedules it again: nothing to load any more.
    assert connector.get_num_new_matched_tokens(request, 0) == (0, False)


def test_kv_that_landed_before_the_request_loads_in_its_step_and_kv_still_on_the_wire_is_waited_for() -> None:
    """A prefill hand-off has always landed when its decode request arrives (the prefill worker answers once
    it is committed), and so has a migration's KV when no part was in flight at the hand-over: vLLM loads
    it in the step that computes the next token. A migration whose last part travels waits for it."""
    connector = _scheduler_half()
    handoff = _load(("a/handoff", 0), tokens=40)
    stopped = _load(("b/s1", 0), tokens=64)
    live = _load(("c/s1", 0), ("c/s2", 3), tokens=64, in_flight=("c/s2",))
    waits = {}
    for rid, params in (("a", handoff), ("b", stopped), ("c", live)):
        request = SimpleNamespace(request_id=rid, kv_transfer_params=params, num_prompt_tokens=65)
        count, waits[rid] = connector.get_num_new_matched_tokens(request, 0)
        connector.update_state_after_alloc(request, _Blocks([0, 1, 2, 3]), count)
    assert waits == {"a": False, "b": False, "c": True}
    meta = connector.build_connector_meta(SimpleNamespace(num_scheduled_tokens={}))
    assert {rid: spec.sync for rid, spec in meta.loads.items()} == {"a": True, "b": True, "c": False}


def test_a_priming_request_loads_the_parts_and_leaves_them_for_the_request_it_primes() -> None:
    """A live migration's priming request loads the pre-copied stages into the destination's prefix cache;
    when it ends, the parts must stay landed (the continuation loads them again if the cache lost them),
    whereas a request that ends before its load has its parts dropped."""
    connector = _scheduler_half()
    prime = _load(("p/m1/0", 0), ("p/m1/1", 2), tokens=64, keep=True)
    plain = _load(("q/m1/0", 0), ("q/m1/1", 2), tokens=64)
    requests = {}
    for rid, params in (("p#prime", prime), ("q", plain)):
        requests[rid] = request = SimpleNamespace(
            request_id=rid, kv_transfer_params=params, num_prompt_tokens=65
        )
        assert connector.get_num_new_matched_tokens(request, 0) == (64, False)
        connector.update_state_after_alloc(request, _Blocks([0, 1, 2, 3, 4]), 64)
    meta = connector.build_connector_meta(SimpleNamespace(num_scheduled_tokens={}))
    assert {rid: spec.keep for rid, spec in meta.loads.items()} == {"p#prime": True, "q": False}
    for request in requests.values():
        connector.request_finished(request, [0, 1, 2, 3, 4])
    assert connector.build_connector_meta(SimpleNamespace(num_scheduled_tokens={})).drops == [
        "q/m1/0",
        "q/m1/1",
    ]


def test_params_it_cannot_read_make_the_request_compute_its_kv_rather_than_stop_the_engine() -> None:
    connector = _scheduler_half()
    params = _load(("m/s1", 0), ("m/s2", 3), tokens=64)
    params["pdflow_parts"] = []  # as a buggy or hostile caller might send it
    request = SimpleNamespace(request_id="m", kv_transfer_params=params, num_prompt_tokens=65)
    assert connector.get_num_new_matched_tokens(request, 0) == (0, False)
    connector.update_state_after_alloc(request, _Blocks([0, 1, 2, 3]), 0)
    assert connector.build_connector_meta(SimpleNamespace(num_scheduled_tokens={})).loads == {}
