"""A Kubernetes API server in one process, for the real ``kubernetes`` client through a real kubeconfig. No
API server can be installed here, so this one speaks the wire protocol for what pdflow's actuator touches:

- ``apps/v1`` Deployments and StatefulSets: get, merge/strategic patch, replace, and their ``/scale``
  subresource (``autoscaling/v1`` Scale: get, patch, replace);
- ``v1`` pods: get, list (label selectors), watch (newline-delimited JSON events), patch, delete;
- ``metadata.resourceVersion`` on every object; a replace or patch carrying a stale one is a 409 Conflict;
  unknown paths are 404s as ``Status`` objects; injected 409s and 500s on scale writes;
- graceful deletion when ``termination_grace_s`` > 0: a deleted pod is Terminating (``deletionTimestamp``,
  a MODIFIED event) for that long, and no longer counted by its controller, before it is DELETED.

It also plays the controllers: a workload's ``spec.replicas`` creates and deletes its pods. A Deployment's
ReplicaSet deletes pods in Kubernetes' order (unscheduled before scheduled, Pending before Running, not ready
before ready, then the lower ``controller.kubernetes.io/pod-deletion-cost``, then the newer); a StatefulSet
removes its highest ordinal. New pods are Pending until the test schedules and readies them (``ready``), so
that Pending and NotReady pods are there to be chosen first.
"""

from __future__ import annotations

import copy
import json
import re
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

DELETION_COST = "controller.kubernetes.io/pod-deletion-cost"
_WORKLOAD = re.compile(r"^/apis/apps/v1/namespaces/([^/]+)/(deployments|statefulsets)/([^/]+)(/scale)?$")
_PODS = re.compile(r"^/api/v1/namespaces/([^/]+)/pods(?:/([^/]+))?$")


class ApiError(Exception):
    def __init__(self, code: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.code, self.reason, self.message = code, reason, message

    def status(self) -> dict[str, Any]:
        return {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        }


class FakeKube:
    """The cluster state and its controllers; ``serve()`` puts the API in front of it."""

    def __init__(self, namespace: str = "pdflow") -> None:
        self.namespace = namespace
        self._lock = threading.Condition()
        self._rv = 0
        self._workloads: dict[tuple[str, str], dict[str, Any]] = {}  # (kind, name) -> object
        self._pods: dict[str, dict[str, Any]] = {}
        self._created: dict[str, int] = {}  # pod -> order of creation (finer than creationTimestamp)
        self._events: list[tuple[int, str, dict[str, Any]]] = []  # (resourceVersion, type, pod)
        self.requests: list[tuple[str, str]] = []  # (method, path) served, for tests
        self.conflicts_to_inject = 0  # the next N writes of a scale answer 409, as a racing writer would
        self.failures_to_inject = 0  # the next N writes of a scale answer 500 (after any conflicts)
        # >0: a deleted pod is Terminating (deletionTimestamp set) this long before it is gone, as a pod
        # whose preStop hook drains it would be
        self.termination_grace_s = 0.0
        self._timers: list[threading.Timer] = []
        self._server: ThreadingHTTPServer | None = None

    # ---- cluster objects (tests and the controllers) ----

    def add_workload(self, kind: str, name: str, replicas: int, *, ready: bool = True) -> None:
        """A Deployment or StatefulSet selecting pods ``app=<name>``, with ``replicas`` pods (ready, or left
        Pending)."""
        plural = "deployments" if kind == "Deployment" else "statefulsets"
        labels = {"app": name}
        spec: dict[str, Any] = {
            "replicas": replicas,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {"containers": [{"name": "w", "image": "w"}]},
            },
        }
        if kind == "StatefulSet":
            spec["serviceName"] = name
        with self._lock:
            self._workloads[(plural, name)] = {
                "apiVersion": "apps/v1",
                "kind": kind,
                "metadata": self._meta(name, labels={}),
                "spec": spec,
                "status": {"replicas": 0},
            }
            self._reconcile(plural, name)
            for pod in self._owned(plural, name):
                if ready:
                    self._set_phase(pod, "Running", True)

    def pods(self, workload: str) -> list[dict[str, Any]]:
        """The workload's live pods (not Terminating)."""
        with self._lock:
            return [copy.deepcopy(p) for p in self._owned_by_label(workload)]

    def pod_names(self, workload: str) -> list[str]:
        return sorted(p["metadata"]["name"] for p in self.pods(workload))

    def terminating(self, workload: str) -> list[str]:
        with self._lock:
            return sorted(
                p["metadata"]["name"]
                for p in self._pods.values()
                if p["metadata"]["labels"].get("app") == workload and p["metadata"].get("deletionTimestamp")
            )

    def ready(self, pod_name: str, *, scheduled: bool = True, ready: bool = True) -> None:
        """Schedule a pod (Running) and make it ready, or schedule it but leave it not ready."""
        with self._lock:
            pod = self._pods[pod_name]
            self._set_phase(pod, "Running" if scheduled else "Pending", ready and scheduled, scheduled)

    def replicas(self, kind: str, name: str) -> int:
        with self._lock:
            return int(self._workloads[(_plural(kind), name)]["spec"]["replicas"])

    def edit_replicas(self, kind: str, name: str, replicas: int) -> None:
        """An operator's ``kubectl scale``: not pdflow's doing."""
        with self._lock:
            self._set_replicas(_plural(kind), name, replicas)

    # ---- the API ----

    def serve(self) -> str:
        """Listen on a free loopback port; returns the server's URL."""
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                fake._dispatch(self, "GET")

            def do_PATCH(self) -> None:
                fake._dispatch(self, "PATCH")

            def do_PUT(self) -> None:
                fake._dispatch(self, "PUT")

            def do_DELETE(self) -> None:
                fake._dispatch(self, "DELETE")

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, name="fake-kube", daemon=True).start()
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def kubeconfig(self, path: Path) -> Path:
        """A kubeconfig naming this server (no credentials: the fake checks none)."""
        url = self.serve() if self._server is None else f"http://127.0.0.1:{self._server.server_address[1]}"
        path.write_text(
            json.dumps(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [{"name": "fake", "cluster": {"server": url}}],
                    "users": [{"name": "pdflow", "user": {"token": "unused"}}],
                    "contexts": [
                        {
                            "name": "fake",
                            "context": {"cluster": "fake", "user": "pdflow", "namespace": self.namespace},
                        }
                    ],
                    "current-context": "fake",
                }
            )
        )
        return path

    def close(self) -> None:
        for timer in self._timers:
            timer.cancel()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        with self._lock:
            self._lock.notify_all()

    def _dispatch(self, handler: BaseHTTPRequestHandler, method: str) -> None:
        url = urlparse(handler.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        length = int(handler.headers.get("Content-Length") or 0)
        body = json.loads(handler.rfile.read(length)) if length else None
        self.requests.append((method, url.path))
        try:
            if method == "GET" and query.get("watch") in ("true", "1"):
                self._watch(handler, url.path, query)
                return
            status, answer = self._route(
                method, url.path, query, body, handler.headers.get("Content-Type", "")
            )
        except ApiError as err:
            status, answer = err.code, err.status()
        payload = json.dumps(answer).encode()
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(payload)))
        handler.end_headers()
        handler.wfile.write(payload)

    def _route(
        self, method: str, path: str, query: dict[str, str], body: Any, content_type: str
    ) -> tuple[int, dict[str, Any]]:
        if (m := _WORKLOAD.match(path)) is not None:
            namespace, plural, name, scale = m.groups()
            self._check_namespace(namespace)
            with self._lock:
                obj = self._workloads.get((plural, name))
                if obj is None:
                    raise ApiError(404, "NotFound", f'{plural}.apps "{name}" not found')
                if scale:
                    return 200, self._scale_call(method, plural, name, body, content_type)
                if method == "GET":
                    return 200, copy.deepcopy(obj)
                if method in ("PATCH", "PUT"):
                    self._check_version(obj, body)
                    updated = _patched(obj, body, content_type) if method == "PATCH" else copy.deepcopy(body)
                    obj["metadata"]["annotations"] = updated["metadata"].get("annotations") or {}
                    if updated["spec"].get("replicas") != obj["spec"]["replicas"]:
                        self._set_replicas(plural, name, int(updated["spec"]["replicas"]))
                    self._bump(obj)
                    return 200, copy.deepcopy(obj)
        if (m := _PODS.match(path)) is not None:
            namespace, name = m.groups()
            self._check_namespace(namespace)
            with self._lock:
                if name is None and method == "GET":
                    items = [copy.deepcopy(p) for p in self._select(query.get("labelSelector", ""))]
                    return 200, {
                        "apiVersion": "v1",
                        "kind": "PodList",
                        "metadata": {"resourceVersion": str(self._rv)},
                        "items": items,
                    }
                pod = self._pods.get(name or "")
                if pod is None:
                    raise ApiError(404, "NotFound", f'pods "{name}" not found')
                if method == "GET":
                    return 200, copy.deepcopy(pod)
                if method == "PATCH":
                    self._check_version(pod, body)
                    annotations = _patched(pod, body, content_type)["metadata"].get("annotations") or {}
                    pod["metadata"]["annotations"] = annotations
                    self._bump(pod, "MODIFIED")
                    return 200, copy.deepcopy(pod)
                if method == "DELETE":
                    self._delete(pod)
                    return 200, copy.deepcopy(pod)
        raise ApiError(404, "NotFound", f"the server could not find the requested resource ({method} {path})")

    def _scale_call(
        self, method: str, plural: str, name: str, body: Any, content_type: str
    ) -> dict[str, Any]:
        obj = self._workloads[(plural, name)]
        if method in ("PATCH", "PUT"):
            if self.conflicts_to_inject > 0:
                self.conflicts_to_inject -= 1
                self._bump(obj)  # someone else wrote it meanwhile
                what = f'{plural}.apps "{name}"'
                raise ApiError(
                    409, "Conflict", f"Operation cannot be fulfilled on {what}: the object has been modified"
                )
            if self.failures_to_inject > 0:
                self.failures_to_inject -= 1
                raise ApiError(500, "InternalError", "etcdserver: request timed out")
            self._check_version(obj, body)
            scale = _patched(_scale_of(obj), body, content_type) if method == "PATCH" else body
            self._set_replicas(plural, name, int(scale["spec"]["replicas"]))
        elif method != "GET":
            raise ApiError(405, "MethodNotAllowed", f"{method} is not allowed on scale")
        return _scale_of(obj)

    def _watch(self, handler: BaseHTTPRequestHandler, path: str, query: dict[str, str]) -> None:
        m = _PODS.match(path)
        if m is None or m.group(2) is not None:
            raise ApiError(404, "NotFound", f"no watch on {path}")
        since = int(query.get("resourceVersion") or 0)
        deadline = time.monotonic() + float(query.get("timeoutSeconds") or 30)
        selector = query.get("labelSelector", "")
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Transfer-Encoding", "chunked")
        handler.end_headers()
        try:
            for event_type, pod in self._events_since(since, selector, deadline):
                line = json.dumps({"type": event_type, "object": pod}).encode() + b"\n"
                handler.wfile.write(f"{len(line):x}\r\n".encode() + line + b"\r\n")
                handler.wfile.flush()
            handler.wfile.write(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _events_since(
        self, since: int, selector: str, deadline: float
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        if not since:  # no resourceVersion: the current pods as ADDED, then what follows
            with self._lock:
                since = self._rv
                current = [copy.deepcopy(p) for p in self._select(selector)]
            yield from (("ADDED", p) for p in current)
        seen = since
        while time.monotonic() < deadline:
            with self._lock:
                fresh = [(rv, t, p) for rv, t, p in self._events if rv > seen]
                if not fresh:
                    self._lock.wait(min(0.05, max(0.0, deadline - time.monotonic())))
                    continue
            for rv, event_type, pod in fresh:
                seen = rv
                if _matches(pod, selector):
                    yield event_type, pod

    # ---- the controllers (the lock is held) ----

    def _set_replicas(self, plural: str, name: str, replicas: int) -> None:
        obj = self._workloads[(plural, name)]
        obj["spec"]["replicas"] = replicas
        self._bump(obj)
        self._reconcile(plural, name)

    def _reconcile(self, plural: str, name: str) -> None:
        obj = self._workloads[(plural, name)]
        want, pods = int(obj["spec"]["replicas"]), self._owned(plural, name)
        if plural == "statefulsets":
            ordinals = {int(p["metadata"]["name"].rsplit("-", 1)[1]) for p in pods}
            for ordinal in range(want):
                if ordinal not in ordinals:
                    self._create_pod(name, f"{name}-{ordinal}")
            for pod in pods:
                if int(pod["metadata"]["name"].rsplit("-", 1)[1]) >= want:
                    self._delete(pod)
        else:
            for _ in range(want - len(pods)):
                self._create_pod(name, f"{name}-{uuid.uuid4().hex[:5]}")
            rank = sorted(pods, key=lambda p: _deletion_rank(p, self._created[p["metadata"]["name"]]))
            for pod in rank[: max(0, len(pods) - want)]:
                self._delete(pod)
        obj["status"] = {"replicas": min(want, len(self._owned(plural, name)))}

    def _create_pod(self, workload: str, name: str) -> None:
        self._pods[name] = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": self._meta(name, labels={"app": workload}),
            "spec": {"containers": [{"name": "w", "image": "w"}]},
            "status": {"phase": "Pending", "conditions": []},
        }
        self._created[name] = self._rv
        self._bump(self._pods[name], "ADDED")

    def _delete(self, pod: dict[str, Any]) -> None:
        if self.termination_grace_s > 0:
            if not pod["metadata"].get("deletionTimestamp"):
                pod["metadata"]["deletionTimestamp"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
                self._bump(pod, "MODIFIED")
                timer = threading.Timer(self.termination_grace_s, self._gone, [pod["metadata"]["name"]])
                timer.daemon = True
                timer.start()
                self._timers.append(timer)
            return
        self._pods.pop(pod["metadata"]["name"], None)
        self._bump(pod, "DELETED")

    def _gone(self, name: str) -> None:
        with self._lock:
            pod = self._pods.pop(name, None)
            if pod is not None:
                self._bump(pod, "DELETED")

    def _set_phase(self, pod: dict[str, Any], phase: str, ready: bool, scheduled: bool = True) -> None:
        pod["spec"]["nodeName"] = "node-1" if scheduled else None
        pod["status"] = {
            "phase": phase,
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
        }
        self._bump(pod, "MODIFIED")

    def _owned(self, plural: str, name: str) -> list[dict[str, Any]]:
        return self._owned_by_label(name)

    def _owned_by_label(self, workload: str) -> list[dict[str, Any]]:
        """The live pods a workload's controller counts (Terminating ones are no longer counted)."""
        return [
            p
            for p in self._pods.values()
            if p["metadata"]["labels"].get("app") == workload and not p["metadata"].get("deletionTimestamp")
        ]

    def _select(self, selector: str) -> list[dict[str, Any]]:
        return sorted(
            (p for p in self._pods.values() if _matches(p, selector)), key=lambda p: p["metadata"]["name"]
        )

    def _meta(self, name: str, labels: dict[str, str]) -> dict[str, Any]:
        self._rv += 1
        return {
            "name": name,
            "namespace": self.namespace,
            "uid": str(uuid.uuid4()),
            "labels": labels,
            "annotations": {},
            "resourceVersion": str(self._rv),
            "creationTimestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }

    def _bump(self, obj: dict[str, Any], event: str = "") -> None:
        self._rv += 1
        obj["metadata"]["resourceVersion"] = str(self._rv)
        if event:
            self._events.append((self._rv, event, copy.deepcopy(obj)))
        self._lock.notify_all()

    def _check_version(self, obj: dict[str, Any], body: Any) -> None:
        sent = (body or {}).get("metadata", {}).get("resourceVersion") if isinstance(body, dict) else None
        if sent and sent != obj["metadata"]["resourceVersion"]:
            what = f'{obj.get("kind", "object")} "{obj["metadata"]["name"]}"'
            raise ApiError(
                409, "Conflict", f"Operation cannot be fulfilled on {what}: the object has been modified"
            )

    def _check_namespace(self, namespace: str) -> None:
        if namespace != self.namespace:
            raise ApiError(404, "NotFound", f'namespaces "{namespace}" not found')


def _plural(kind: str) -> str:
    return "deployments" if kind == "Deployment" else "statefulsets"


def _scale_of(obj: dict[str, Any]) -> dict[str, Any]:
    labels = obj["spec"]["selector"]["matchLabels"]
    return {
        "apiVersion": "autoscaling/v1",
        "kind": "Scale",
        "metadata": {
            "name": obj["metadata"]["name"],
            "namespace": obj["metadata"]["namespace"],
            "resourceVersion": obj["metadata"]["resourceVersion"],
            "uid": obj["metadata"]["uid"],
        },
        "spec": {"replicas": obj["spec"]["replicas"]},
        "status": {
            "replicas": obj["status"].get("replicas", 0),
            "selector": ",".join(f"{k}={v}" for k, v in labels.items()),
        },
    }


def _deletion_rank(pod: dict[str, Any], created: int) -> tuple[Any, ...]:
    """Kubernetes' order for a ReplicaSet's scale-down (``controller.ActivePodsWithRanks``), first deleted
    first: unscheduled, then Pending, then not ready, then the lower deletion cost, then the newer."""
    scheduled = bool(pod["spec"].get("nodeName"))
    phase = {"Pending": 0, "Unknown": 1, "Running": 2}.get(pod["status"].get("phase", "Pending"), 2)
    ready = any(c["type"] == "Ready" and c["status"] == "True" for c in pod["status"].get("conditions", []))
    cost = int(pod["metadata"].get("annotations", {}).get(DELETION_COST, "0"))
    return (scheduled, phase, ready, cost, -created)


def _matches(pod: dict[str, Any], selector: str) -> bool:
    labels = pod["metadata"]["labels"]
    for term in filter(None, (s.strip() for s in selector.split(","))):
        key, _, value = term.partition("=")
        if labels.get(key) != value:
            return False
    return True


def _patched(obj: dict[str, Any], body: Any, content_type: str) -> dict[str, Any]:
    """``obj`` with ``body`` applied as the patch ``content_type`` names (JSON patch or merge patch)."""
    result = copy.deepcopy(obj)
    if "json-patch" in content_type:
        for op in body:
            parts = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]]
            parent = result
            for part in parts[:-1]:
                parent = parent.setdefault(part, {})
            if op["op"] == "test" and parent.get(parts[-1]) != op["value"]:
                raise ApiError(422, "Invalid", f"the test of {op['path']} failed")
            if op["op"] in ("add", "replace"):
                parent[parts[-1]] = op["value"]
            elif op["op"] == "remove":
                parent.pop(parts[-1], None)
        return result
    _merge(result, body)
    return result


def _merge(target: dict[str, Any], patch: dict[str, Any]) -> None:
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        elif isinstance(value, dict) and isinstance(target.get(key), dict):
            _merge(target[key], value)
        else:
            target[key] = copy.deepcopy(value)
