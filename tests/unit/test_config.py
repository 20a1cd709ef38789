from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from protocol.config import ClusterConfig, DispatchPolicyKind
from protocol.kv_config import KVCodecKind, KVQualityFloor, KVTransferConfig


def test_file_then_environment_then_overrides(tmp_path: Path) -> None:
    path = tmp_path / "cluster.yaml"
    path.write_text("decode:\n  replicas: 3\nfrontdoor:\n  http_port: 9000\n  dispatch: round_robin\n")
    cfg = ClusterConfig.load(
        path,
        {"frontdoor.http_port": "9100"},
        environ={"PDFLOW__DECODE__REPLICAS": "4", "PDFLOW__ENGINE__MAX_MODEL_LEN": "4096"},
    )
    assert cfg.decode.replicas == 4
    assert cfg.engine.max_model_len == 4096
    assert cfg.frontdoor.http_port == 9100
    assert cfg.frontdoor.dispatch is DispatchPolicyKind.ROUND_ROBIN


def test_unknown_fields_and_bad_values_are_rejected_by_name() -> None:
    with pytest.raises(ValidationError, match="replica"):
        ClusterConfig.load(overrides={"decode.replica": 2}, environ={})
    with pytest.raises(ValidationError, match="max_model_len"):
        ClusterConfig.load(overrides={"engine.max_model_len": 3}, environ={})


def test_defaults_are_one_prefill_one_decode_on_loopback() -> None:
    cfg = ClusterConfig.load(environ={})
    assert (cfg.prefill.replicas, cfg.decode.replicas, cfg.frontdoor.host) == (1, 1, "127.0.0.1")


def test_request_choice_names_its_options_when_wrong() -> None:
    with pytest.raises(ValidationError, match="least_kv_to_copy"):
        ClusterConfig.load(overrides={"migration.request_choice": "newest"}, environ={})


def test_the_kv_section_is_set_like_any_other() -> None:
    cfg = ClusterConfig.load(
        overrides={"kv.codec": "int8", "kv.quality_floor": "int4"},
        environ={"PDFLOW__KV__LEASE_SECONDS": "30"},
    )
    assert (cfg.kv.codec, cfg.kv.quality_floor, cfg.kv.lease_seconds) == (
        KVCodecKind.INT8,
        KVQualityFloor.INT4,
        30,
    )
    with pytest.raises(ValidationError, match="'auto', 'none', 'lossless', 'fp8', 'int8' or 'int4'"):
        ClusterConfig.load(overrides={"kv.codec": "int9"}, environ={})
    with pytest.raises(ValidationError, match="kv_codec"):
        ClusterConfig.load(overrides={"engine.kv_codec": "int8"}, environ={})  # where it used to be


@settings(max_examples=50, deadline=None)
@given(
    codec=st.sampled_from(list(KVCodecKind)),
    floor=st.sampled_from(list(KVQualityFloor)),
    group=st.integers(8, 4096),
    nice=st.integers(0, 19),
    precopy=st.one_of(st.none(), st.floats(0, 10)),
    zero_copy=st.booleans(),
    lease=st.integers(6, 600),
)
def test_the_connector_reads_back_exactly_the_kv_settings_the_engine_host_hands_vllm(
    codec: KVCodecKind,
    floor: KVQualityFloor,
    group: int,
    nice: int,
    precopy: float | None,
    zero_copy: bool,
    lease: int,
) -> None:
    """One model from the YAML file to the connector: what the engine host puts in vLLM's extra config is
    read back by the connector with the same defaults (they once disagreed: transfer_nice 10 against 0)."""
    from engine.kv_handoff import PdflowHandoff
    from engine.stats import EngineStats

    kv = KVTransferConfig(
        codec=codec,
        quality_floor=floor,
        group_size=group,
        transfer_nice=nice,
        precopy_gbps=precopy,
        zero_copy=zero_copy,
        lease_seconds=lease,
    )
    extra = PdflowHandoff(kv, EngineStats()).extra_config()
    assert json.loads(json.dumps(extra)) == extra  # vLLM copies it into its processes as plain values
    assert KVTransferConfig.from_connector(extra) == kv
    assert KVTransferConfig.from_connector({}) == KVTransferConfig() == ClusterConfig().kv


def test_the_connector_refuses_a_setting_it_does_not_know() -> None:
    with pytest.raises(ValidationError, match="transfer_niceness"):
        KVTransferConfig.from_connector({"transfer_niceness": 3})


def test_two_servers_on_one_port_are_refused_with_both_named() -> None:
    """A second front door on the default ports would take gRPC 50052, the admin port."""
    with pytest.raises(
        ValueError, match=r"front door 1's grpc_port and controller\.admin_port are both port 50052"
    ):
        ClusterConfig.load(None, {"frontdoor.replicas": 2})
    assert (
        ClusterConfig.load(None, {"frontdoor.replicas": 2, "controller.admin_port": 50060}).frontdoor.replicas
        == 2
    )
