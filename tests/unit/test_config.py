from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from protocol.config import ClusterConfig, DispatchPolicyKind


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


def test_the_migration_policy_takes_its_request_choice_and_headroom_from_the_config() -> None:
    from controller.migrations import policy_config
    from controller.policy.migration import RequestChoice

    cfg = ClusterConfig.load(
        overrides={"migration.request_choice": "lowest_priority", "migration.headroom_blocks": "8"},
        environ={},
    )
    policy = policy_config(cfg.migration)
    assert (policy.choice, policy.headroom_blocks) == (RequestChoice.LOWEST_PRIORITY, 8)
    assert policy_config(ClusterConfig.load(environ={}).migration).choice is RequestChoice.LEAST_KV_TO_COPY
    with pytest.raises(ValidationError, match="least_kv_to_copy"):
        ClusterConfig.load(overrides={"migration.request_choice": "newest"}, environ={})
