"""Credentials as an operator gives them (environment variables, files, digests) and the rule that a server
reachable from other machines has them."""

from __future__ import annotations

from pathlib import Path

import pytest

from protocol.auth import (
    CredentialError,
    Credentials,
    admin_token_from_env,
    api_key_headers,
    bearer,
    is_loopback,
    key_digest_line,
)

ADMIN = "an-admin-token-of-some-length"
SECRET = "a-cluster-secret-long-enough"


def test_keys_from_the_variable_and_the_file_with_digests_comments_and_blank_lines(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys"
    keys_file.write_text(f"# team A\nfile-key\n\n{key_digest_line('hashed-key')}  # team B\n")
    creds = Credentials.from_env(
        {"PDFLOW_API_KEYS": " env-key-1, env-key-2 ,", "PDFLOW_API_KEYS_FILE": str(keys_file)}
    )
    for key in ("env-key-1", "env-key-2", "file-key", "hashed-key"):
        assert creds.allows_api(f"Bearer {key}"), key
    for wrong in (None, "", "Bearer", "Bearer ", "env-key-1", "Basic env-key-1", "Bearer env-key-3"):
        assert not creds.allows_api(wrong), wrong
    assert not creds.allows_api(f"Bearer {key_digest_line('hashed-key')}")  # the digest is no key
    assert creds.allows_api("bearer   file-key  ")  # the scheme in any case, spaces around


def test_keys_are_kept_only_as_digests_and_nothing_shows_in_a_repr() -> None:
    creds = Credentials.from_env(
        {"PDFLOW_API_KEYS": "plain-key", "PDFLOW_ADMIN_TOKEN": ADMIN, "PDFLOW_CLUSTER_SECRET": SECRET}
    )
    assert all(len(d) == 32 for d in creds.api_keys)
    assert repr(creds) == "Credentials()"  # no key, digest or secret in a traceback or a log line


def test_without_credentials_every_surface_is_open_and_only_loopback_may_bind() -> None:
    creds = Credentials.from_env({})
    assert creds.allows_api(None) and creds.allows_admin(None) and creds.allows_metrics(None)
    assert creds.ray_token() is None
    for host in ("127.0.0.1", "::1", "[::1]", "localhost", "127.3.2.1"):
        creds.require_api_keys_for(host)
        creds.require_admin_token_for(host)
        creds.require_cluster_secret_for(host)
    with pytest.raises(CredentialError, match=r"0\.0\.0\.0.*PDFLOW_API_KEYS.*PDFLOW_API_KEYS_FILE"):
        creds.require_api_keys_for("0.0.0.0")
    with pytest.raises(CredentialError, match="PDFLOW_ADMIN_TOKEN"):
        creds.require_admin_token_for("10.0.0.7")
    with pytest.raises(CredentialError, match="PDFLOW_CLUSTER_SECRET"):
        creds.require_cluster_secret_for("pdflow-decode-0.pdflow")
    assert not is_loopback("example.com")


def test_each_credential_opens_its_own_surface_only() -> None:
    scraper = "a-metrics-token-for-prometheus"
    creds = Credentials.from_env(
        {
            "PDFLOW_API_KEYS": "api-key",
            "PDFLOW_ADMIN_TOKEN": ADMIN,
            "PDFLOW_METRICS_TOKEN": scraper,
            "PDFLOW_CLUSTER_SECRET": SECRET,
        }
    )
    assert creds.allows_api("Bearer api-key") and not creds.allows_api(f"Bearer {ADMIN}")
    assert not creds.allows_api(f"Bearer {scraper}")
    assert creds.allows_admin(f"Bearer {ADMIN}") and not creds.allows_admin("Bearer api-key")
    assert not creds.allows_admin(f"Bearer {scraper}")
    assert creds.allows_metrics("Bearer api-key") and creds.allows_metrics(f"Bearer {scraper}")
    assert not creds.allows_metrics(None) and not creds.allows_metrics(f"Bearer {ADMIN}")
    creds.require_api_keys_for("0.0.0.0")
    creds.require_admin_token_for("0.0.0.0")
    creds.require_cluster_secret_for("0.0.0.0")
    token = creds.ray_token()
    assert token is not None and SECRET not in token and len(token) == 64
    assert token == Credentials.from_env({"PDFLOW_CLUSTER_SECRET": SECRET}).ray_token()  # every process


def test_a_secret_from_a_file_is_taken_whole(tmp_path: Path) -> None:
    (tmp_path / "token").write_text(f"{ADMIN}#with-a-hash\n")
    env = {"PDFLOW_ADMIN_TOKEN_FILE": str(tmp_path / "token")}
    assert Credentials.from_env(env).allows_admin(f"Bearer {ADMIN}#with-a-hash")
    assert admin_token_from_env(env) == f"{ADMIN}#with-a-hash"
    env["PDFLOW_ADMIN_TOKEN"] = f"{ADMIN}#with-a-hash"  # both, the same: fine
    assert Credentials.from_env(env).admin_token is not None


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"PDFLOW_ADMIN_TOKEN": "short"}, "at least 16"),
        ({"PDFLOW_CLUSTER_SECRET": "short"}, "at least 16"),
        ({"PDFLOW_API_KEYS": "sha256:abc"}, "not a SHA-256 digest"),
        ({"PDFLOW_API_KEYS": "sha256:" + "zz" * 32}, "not a SHA-256 digest"),
        ({"PDFLOW_API_KEYS_FILE": "/nonexistent/keys"}, "cannot read"),
        ({"PDFLOW_ADMIN_TOKEN_FILE": "/dev/null"}, "is empty"),
        ({"PDFLOW_API_KEYS_FILE": "/dev/null"}, "holds no key"),
        ({"PDFLOW_ADMIN_TOKEN": "x" + ADMIN, "PDFLOW_ADMIN_TOKEN_FILE": "TOKEN_FILE"}, "both set and differ"),
    ],
)
def test_a_misconfigured_credential_is_refused_with_the_fix(
    env: dict[str, str], message: str, tmp_path: Path
) -> None:
    (tmp_path / "token").write_text(ADMIN)
    env = {k: str(tmp_path / "token") if v == "TOKEN_FILE" else v for k, v in env.items()}
    with pytest.raises(CredentialError, match=message):
        Credentials.from_env(env)


def test_clients_send_what_is_in_their_environment() -> None:
    assert api_key_headers({"PDFLOW_API_KEY": "k"}) == {"Authorization": "Bearer k"}
    assert api_key_headers({}) == {}
    assert admin_token_from_env({}) is None
    assert bearer("Bearer a b") == "a b" and bearer("Token x") is None


@pytest.mark.parametrize(
    ("args", "needs"),
    [
        (["up", "--set", "frontdoor.host=0.0.0.0"], "PDFLOW_API_KEYS"),
        (["up", "--set", "controller.admin_host=10.1.2.3"], "PDFLOW_ADMIN_TOKEN"),
        (
            ["pod", "worker", "--role", "decode", "--set", "kv.side_channel_host=10.1.2.3"],
            "PDFLOW_CLUSTER_SECRET",
        ),
        (["pod", "head", "--set", "frontdoor.host=0.0.0.0"], "PDFLOW_API_KEYS"),
        (
            ["up", "--set", "kv.connector=nixl", "--set", "kv.side_channel_host=10.1.2.3"],
            "PDFLOW_CLUSTER_SECRET",
        ),
    ],
)
def test_pdctl_refuses_to_start_open_to_other_machines(
    args: list[str], needs: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from pdctl import cli, pod  # noqa: F401  (registers the commands)
    from pdctl.options import app

    for name in ("PDFLOW_API_KEYS", "PDFLOW_ADMIN_TOKEN", "PDFLOW_CLUSTER_SECRET"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(f"{name}_FILE", raising=False)
    result = CliRunner().invoke(app, args, env={"POD_NAME": "pdflow-decode-0", "COLUMNS": "400"})
    assert result.exit_code == 1, result.output
    assert "will not serve" in result.output and needs in result.output


def test_pdctl_auth_makes_keys_and_the_digest_lines_that_stand_for_them(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from pdctl import auth  # noqa: F401  (registers the commands)
    from pdctl.options import app

    runner = CliRunner()
    keys = [runner.invoke(app, ["auth", "new-key"]).output.strip() for _ in range(2)]
    assert keys[0] != keys[1] and all(k.startswith("sk-") and len(k) > 40 for k in keys)
    hashed = runner.invoke(app, ["auth", "hash-key"], input="\n".join(keys) + "\n")
    assert hashed.exit_code == 0 and all(k not in hashed.output for k in keys)
    (tmp_path / "keys").write_text(hashed.output)
    creds = Credentials.from_env({"PDFLOW_API_KEYS_FILE": str(tmp_path / "keys")})
    assert all(creds.allows_api(f"Bearer {k}") for k in keys) and not creds.allows_api("Bearer sk-other")
    assert runner.invoke(app, ["auth", "hash-key"], input="").exit_code == 1


def test_vllms_nixl_connector_is_refused_off_loopback_even_with_the_secret(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from typer.testing import CliRunner

    from pdctl import cli  # noqa: F401  (registers the commands)
    from pdctl.options import app

    monkeypatch.setenv("PDFLOW_CLUSTER_SECRET", SECRET)
    args = ["up", "--set", "kv.connector=nixl", "--set", "kv.side_channel_host=10.1.2.3"]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "400"})
    assert (
        result.exit_code == 1
        and "no authentication" in result.output
        and "kv.connector: pdflow" in result.output
    )
