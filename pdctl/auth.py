"""``pdctl auth``: make credentials (``protocol.auth``): a new random key or token, and the line an API keys
file holds in place of a key (its SHA-256 digest), so that the key itself need not be on the server."""

from __future__ import annotations

import secrets
import sys
from typing import Annotated

import typer

from pdctl.options import app, fail, out
from protocol.auth import key_digest_line

auth_app = typer.Typer(
    help="Make API keys, tokens and the digests an API keys file may hold.", no_args_is_help=True
)
app.add_typer(auth_app, name="auth")


@auth_app.command("new-key")
def new_key(
    prefix: Annotated[str, typer.Option(help="Put before the random part (API keys: sk-).")] = "sk-",
) -> None:
    """Print a new random key (32 bytes, URL-safe): an API key, or with --prefix '' a token or secret."""
    out.print(prefix + secrets.token_urlsafe(32), highlight=False)


@auth_app.command("hash-key")
def hash_key(
    key: Annotated[
        str | None, typer.Argument(help="The key; read from stdin when left out (one per line).")
    ] = None,
) -> None:
    """Print sha256:<digest> for each key: lines for PDFLOW_API_KEYS_FILE that do not reveal the keys."""
    keys = [key] if key is not None else [line.strip() for line in sys.stdin if line.strip()]
    if not keys:
        fail("no key given: pass one, or one per line on stdin")
    for k in keys:
        out.print(key_digest_line(k), highlight=False)
