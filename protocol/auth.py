"""Who may call pdflow: the three credentials its surfaces check, where they come from, and the rule that a
server other hosts can reach has them.

- **API keys**: the OpenAI HTTP API (``Authorization: Bearer <key>``) and the gRPC Router (the same in the
  ``authorization`` metadata). ``/health`` stays open for probes and load balancers; ``/metrics`` takes an
  API key or the metrics token (``PDFLOW_METRICS_TOKEN``: what a scraper holds, good for nothing else).
- **The admin token**: the admin gRPC API (migrate, cordon, drain, scale), which ``pdctl`` and the pods'
  preStop hook call.
- **The cluster secret**: shared by every process of one cluster. The KV side channel signs each message
  with it (HMAC-SHA256) and refuses one that is not signed with it; ``pdctl up`` derives Ray's token from it
  (the Helm chart gives Ray a token of its own).

Each comes from an environment variable holding the value (``PDFLOW_API_KEYS``: comma-separated) or from a
file it names (``PDFLOW_API_KEYS_FILE``: one key per line, ``#`` comments): a Kubernetes Secret is mounted as
either. A key may be given as ``sha256:<hex digest>``, so that the key itself is on no disk. Keys and the
admin token are kept only as SHA-256 digests and compared in constant time.

Without credentials, a server binds loopback only (``require_for_bind``): a laptop cluster needs no set-up,
and nothing reachable from another host is ever open.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

API_KEYS_ENV = "PDFLOW_API_KEYS"
ADMIN_TOKEN_ENV = "PDFLOW_ADMIN_TOKEN"
METRICS_TOKEN_ENV = "PDFLOW_METRICS_TOKEN"
CLUSTER_SECRET_ENV = "PDFLOW_CLUSTER_SECRET"
CLIENT_API_KEY_ENV = "PDFLOW_API_KEY"  # the key pdctl sends, as a client
_DIGEST_PREFIX = "sha256:"
MIN_SECRET_CHARS = 16


class CredentialError(ValueError):
    """A credential is configured wrongly (an unreadable file, a malformed digest, a short secret), or a
    server would be open to other hosts without one. The message says how to set it."""


def is_loopback(host: str) -> bool:
    """Whether only this machine can reach a server bound to ``host``."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def bearer(header: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` value (the scheme in any case), else None."""
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


def caller_id(authorization: str | None) -> str:
    """Who a request comes from, for per-key limits: a digest of its bearer token (never the token); "" for
    a request without one."""
    token = bearer(authorization)
    return _digest(token).hex()[:16] if token else ""


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


@dataclass(frozen=True)
class Credentials:
    """What this process accepts. Empty: that surface is open (and so may bind loopback only)."""

    # never in a repr (a traceback, a log line): the digests would do for a guessing attack offline
    api_keys: frozenset[bytes] = field(default=frozenset(), repr=False)  # SHA-256 digests
    admin_token: bytes | None = field(default=None, repr=False)  # its SHA-256 digest
    metrics_token: bytes | None = field(default=None, repr=False)  # its SHA-256 digest
    cluster_secret: bytes | None = field(default=None, repr=False)  # the HMAC key itself (signing needs it)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Credentials:
        env = os.environ if environ is None else environ
        keys = [_key_digest(k, API_KEYS_ENV) for k in _values(env, API_KEYS_ENV, split=True)]
        admin = _single(env, ADMIN_TOKEN_ENV)
        metrics = _single(env, METRICS_TOKEN_ENV)
        secret = _single(env, CLUSTER_SECRET_ENV)
        for name, value in (
            (ADMIN_TOKEN_ENV, admin),
            (METRICS_TOKEN_ENV, metrics),
            (CLUSTER_SECRET_ENV, secret),
        ):
            if value is not None and len(value) < MIN_SECRET_CHARS:
                raise CredentialError(
                    f"{name} is {len(value)} characters; use at least {MIN_SECRET_CHARS} random ones "
                    "(for example: python -c 'import secrets; print(secrets.token_urlsafe(32))')."
                )
        return cls(
            api_keys=frozenset(keys),
            admin_token=_digest(admin) if admin is not None else None,
            metrics_token=_digest(metrics) if metrics is not None else None,
            cluster_secret=secret.encode() if secret is not None else None,
        )

    def allows_api(self, authorization: str | None) -> bool:
        """Whether an ``Authorization`` value may call the API (always, when no key is configured)."""
        if not self.api_keys:
            return True
        return _matches(bearer(authorization), self.api_keys)

    def allows_admin(self, authorization: str | None) -> bool:
        """Whether an ``Authorization`` value may call the admin API (always, when no token is set)."""
        if self.admin_token is None:
            return True
        return _matches(bearer(authorization), frozenset({self.admin_token}))

    def allows_metrics(self, authorization: str | None) -> bool:
        """``/metrics``: an API key or the metrics token (open when neither is configured)."""
        if not self.api_keys and self.metrics_token is None:
            return True
        digests = self.api_keys | ({self.metrics_token} if self.metrics_token is not None else set())
        return _matches(bearer(authorization), frozenset(digests))

    # A server other machines can reach needs its credential; each refusal says how to set it.

    def require_api_keys_for(self, host: str) -> None:
        _require_for_bind(
            "the OpenAI and gRPC APIs",
            host,
            bool(self.api_keys),
            f"set {API_KEYS_ENV} (comma-separated keys) or {API_KEYS_ENV}_FILE (a file with one key per "
            "line, for example a mounted Kubernetes Secret; the Helm chart makes one).",
        )

    def require_admin_token_for(self, host: str) -> None:
        _require_for_bind(
            "the admin API",
            host,
            self.admin_token is not None,
            f"set {ADMIN_TOKEN_ENV} (or {ADMIN_TOKEN_ENV}_FILE, a file holding it) here and for pdctl.",
        )

    def require_cluster_secret_for(self, host: str) -> None:
        _require_for_bind(
            "the KV side channel",
            host,
            self.cluster_secret is not None,
            f"set the same {CLUSTER_SECRET_ENV} (or {CLUSTER_SECRET_ENV}_FILE) in every pdflow process.",
        )

    def ray_token(self) -> str | None:
        """Ray's auth token (``RAY_AUTH_TOKEN``), derived from the cluster secret so that one Secret serves
        both and neither reveals the other."""
        if self.cluster_secret is None:
            return None
        return hmac.new(self.cluster_secret, b"pdflow ray token", hashlib.sha256).hexdigest()


def api_key_headers(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The header a client of the HTTP API (``pdctl chat``, ``pdctl bench``) sends: the key in
    ``PDFLOW_API_KEY``, if set."""
    key = (os.environ if environ is None else environ).get(CLIENT_API_KEY_ENV, "").strip()
    return {"Authorization": f"Bearer {key}"} if key else {}


def admin_token_from_env(environ: Mapping[str, str] | None = None) -> str | None:
    """The admin token itself, for a client (``pdctl``, the preStop hook) to send."""
    return _single(os.environ if environ is None else environ, ADMIN_TOKEN_ENV)


def _matches(token: str | None, digests: frozenset[bytes]) -> bool:
    if token is None:
        return False
    presented = _digest(token)
    found = False
    for digest in digests:  # every one compared: the time taken says nothing about which matched
        found |= hmac.compare_digest(presented, digest)
    return found


def _values(env: Mapping[str, str], name: str, *, split: bool) -> list[str]:
    """The values of ``name`` and of the file ``name_FILE`` names; a list file (``split``) drops blank lines
    and ``#`` comments."""
    values: list[str] = []
    if raw := env.get(name, "").strip():
        values += [v.strip() for v in raw.split(",")] if split else [raw]
    if path := env.get(f"{name}_FILE", "").strip():
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise CredentialError(f"{name}_FILE={path}: cannot read it ({exc.strerror}).") from None
        if split:
            lines = [line.split("#", 1)[0].strip() for line in text.splitlines()]
            if not any(lines):
                raise CredentialError(f"{name}_FILE={path} holds no key (one per line).")
            values += [line for line in lines if line]
        elif text.strip():
            values.append(text.strip())
        else:
            raise CredentialError(f"{name}_FILE={path} is empty.")
    return [v for v in values if v]


def _single(env: Mapping[str, str], name: str) -> str | None:
    values = _values(env, name, split=False)
    if len(values) > 1 and len(set(values)) > 1:
        raise CredentialError(f"{name} and {name}_FILE are both set and differ; set one of them.")
    return values[0] if values else None


def _key_digest(key: str, source: str) -> bytes:
    if not key.lower().startswith(_DIGEST_PREFIX):
        return _digest(key)
    hexdigest = key[len(_DIGEST_PREFIX) :]
    try:
        digest = bytes.fromhex(hexdigest)
    except ValueError:
        digest = b""
    if len(digest) != hashlib.sha256().digest_size:
        raise CredentialError(
            f"{source}: {key[:16]}... is not a SHA-256 digest (sha256: then 64 hex digits, as "
            "`pdctl auth hash-key` prints)."
        )
    return digest


def key_digest_line(key: str) -> str:
    """The line to put in an API keys file in place of ``key`` itself."""
    return _DIGEST_PREFIX + hashlib.sha256(key.encode()).hexdigest()


def _require_for_bind(what: str, host: str, configured: bool, how: str) -> None:
    if configured or is_loopback(host):
        return
    raise CredentialError(
        f"pdflow will not serve {what} on {host}, an address other machines can reach, without "
        f"authentication: {how} Or bind 127.0.0.1 to keep it on this machine."
    )
