"""Ray actor handles by name. Looking a handle up is a blocking call to Ray's control store (GCS), so each is
looked up once, off the event loop, and kept until a call to it fails (the actor may have been restarted or
be gone); every call through the directory has a deadline."""

from __future__ import annotations

import asyncio
from typing import Any

NAMESPACE = "pdflow"
CONTROLLER_NAME = "pdflow-controller"


class ActorGone(LookupError):
    """No live actor of that name in the namespace."""


class ActorDirectory:
    def __init__(self, namespace: str = NAMESPACE, *, lookup_timeout_s: float = 10.0) -> None:
        self.namespace = namespace
        self._lookup_timeout_s = lookup_timeout_s
        self._handles: dict[str, Any] = {}

    def get(self, name: str) -> Any:
        """The handle of actor ``name``, looked up at most once (blocks for that lookup). ``ActorGone`` if
        there is none."""
        handle = self._handles.get(name)
        if handle is None:
            import ray

            try:
                handle = ray.get_actor(name, namespace=self.namespace)
            except ValueError as err:
                raise ActorGone(f"actor {name} is gone") from err
            self._handles[name] = handle
        return handle

    async def handle(self, name: str) -> Any:
        """``get`` without blocking the event loop on the lookup, within the lookup deadline
        (``TimeoutError``)."""
        if (handle := self._handles.get(name)) is not None:
            return handle
        return await asyncio.wait_for(asyncio.to_thread(self.get, name), self._lookup_timeout_s)

    def forget(self, name: str) -> None:
        """Drop a handle whose actor failed a call: the next call looks it up again."""
        self._handles.pop(name, None)

    async def call(self, name: str, method: str, *args: Any, timeout_s: float) -> Any:
        """``name.method(*args)`` with a deadline (``TimeoutError``); a failed call forgets the handle and
        raises the actor's error (Ray's ``RayError``), a missing actor ``ActorGone``."""
        handle = await self.handle(name)
        try:
            return await asyncio.wait_for(getattr(handle, method).remote(*args), timeout_s)
        except Exception:
            self.forget(name)
            raise
