"""Where a running local cluster is written down: ``<cache>/run/cluster.json`` holds the ``pdctl up``
process id and the cluster's addresses, so that ``pdctl status``, ``chat``, ``bench`` and ``down`` find it."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from pdctl.model_cache import default_cache_dir


def run_dir() -> Path:
    return Path(os.environ.get("PDFLOW_RUN_DIR") or default_cache_dir().parents[1] / "run")


@dataclass(frozen=True)
class RunState:
    pid: int
    http_url: str
    grpc_address: str
    admin_address: str

    @staticmethod
    def path() -> Path:
        return run_dir() / "cluster.json"

    def write(self) -> None:
        path = self.path()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self)))
        tmp.replace(path)

    @classmethod
    def read(cls) -> RunState | None:
        """The running cluster, or None if there is none (a stale file of a dead process is removed)."""
        try:
            state = cls(**json.loads(cls.path().read_text()))
        except (OSError, ValueError, TypeError):
            return None
        if not _alive(state.pid):
            cls.clear()
            return None
        return state

    @classmethod
    def clear(cls) -> None:
        cls.path().unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
