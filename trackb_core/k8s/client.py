"""The one module that imports the ``kubernetes`` SDK.

Everything else in trackb speaks plain dicts (the Job builder returns them, the
launcher reads them); this module turns them into API calls and back. It is kept
small on purpose: :data:`RBAC_RULES` lists every (API group, resource) and verb used
below, and the Helm chart's Role is tested against it, so a new call here must be
granted there too.

Objects are read with ``_preload_content=False`` and parsed as JSON: the launcher
wants the API's own field names (``podFailurePolicy``), not the SDK's model classes.
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from trackb_core.errors import ConfigError, UnavailableError

# (API group, resource) -> verbs the launcher uses. The chart's Role must grant exactly
# these (tests compare them); no wildcards. Kinds in NAMED_ONLY are granted only for the
# names the config gives (resourceNames), never the whole kind.
RBAC_RULES: dict[tuple[str, str], frozenset[str]] = {
    ("batch", "jobs"): frozenset({"create", "get", "list", "watch", "delete"}),
    ("", "pods"): frozenset({"list"}),
    ("", "pods/log"): frozenset({"get"}),
    ("", "events"): frozenset({"list"}),
    # patch: ownerReferences. A stage's ConfigMap, Service and NetworkPolicy are created
    # before its Job and then owned by it; the vLLM server is owned by its launcher.
    ("", "services"): frozenset({"create", "get", "patch", "delete"}),
    ("apps", "deployments"): frozenset({"create", "get", "patch", "delete"}),
    ("networking.k8s.io", "networkpolicies"): frozenset({"create", "get", "patch", "delete"}),
    ("", "configmaps"): frozenset({"create", "get", "patch", "delete"}),
    # One Lease per run id: a second launcher of the run waits instead of fighting.
    ("coordination.k8s.io", "leases"): frozenset({"create", "get", "patch", "delete"}),
    # Preflight (trackb_core/k8s/preflight.py): the objects a run's pods need exist.
    ("", "persistentvolumeclaims"): frozenset({"get"}),
    ("", "secrets"): frozenset({"get"}),
    # A multi-node training as a JobSet (kubernetes.distributed.gang 'jobset').
    ("jobset.x-k8s.io", "jobsets"): frozenset({"create", "get", "delete"}),
    # Kueue: why a queued Job stays suspended (its Workload), and preflight's check that
    # the LocalQueue exists.
    ("kueue.x-k8s.io", "workloads"): frozenset({"list"}),
    ("kueue.x-k8s.io", "localqueues"): frozenset({"get"}),
}
# Only the configured Secrets (jobspec.secret_names), so that the Role never reads others.
NAMED_ONLY: frozenset[tuple[str, str]] = frozenset({("", "secrets")})
# Calls outside the namespaced Role, all made by preflight. Cluster-scoped reads are
# best-effort (a 403 is reported as a check skipped; a ClusterRole may grant them), and
# any identity may review its own permissions (the system:basic-user ClusterRole).
OUTSIDE_ROLE: dict[tuple[str, str], frozenset[str]] = {
    ("scheduling.k8s.io", "priorityclasses"): frozenset({"get"}),
    ("node.k8s.io", "runtimeclasses"): frozenset({"get"}),
    ("", "nodes"): frozenset({"list"}),
    ("authorization.k8s.io", "selfsubjectaccessreviews"): frozenset({"create"}),
}

INSTALL_HINT = ("the Kubernetes backend needs the 'kubernetes' package: "
                "pip install 'trackb[k8s]' (or pip install kubernetes)")

# kind -> (SDK API class, method suffix); the namespaced create/read/delete methods are
# named <verb>_namespaced_<suffix>.
_KINDS = {
    "Job": ("BatchV1Api", "job"),
    "ConfigMap": ("CoreV1Api", "config_map"),
    "Service": ("CoreV1Api", "service"),
    "Deployment": ("AppsV1Api", "deployment"),
    "NetworkPolicy": ("NetworkingV1Api", "network_policy"),
    "Lease": ("CoordinationV1Api", "lease"),
}


# Custom resources: kind -> (API group, version, plural), served by CustomObjectsApi.
_CUSTOM = {
    "JobSet": ("jobset.x-k8s.io", "v1alpha2", "jobsets"),
    "LocalQueue": ("kueue.x-k8s.io", "v1beta1", "localqueues"),
    "Workload": ("kueue.x-k8s.io", "v1beta1", "workloads"),
}


class WatchExpired(Exception):
    """The watch's resourceVersion is too old (HTTP 410 Gone): list again, then watch."""


class Forbidden(Exception):
    """The API refused a call with 403: this identity may not make it."""


# Answers that say "not now": rate limited, or the API server (or a proxy before it) is
# restarting or overloaded. Anything else (400, 403, 404, 409, 422) will not change by
# asking again.
RETRIED_STATUSES = frozenset({429, 500, 502, 503, 504})


@dataclass
class RetryPolicy:
    """Retries of API calls that failed for a passing reason: a dropped connection, a 429
    or a 5xx. Waits grow exponentially with full jitter (so that many launchers do not
    retry in step), a 429's Retry-After is honoured, and after ``seconds`` in all the last
    error is raised. ``sleep`` and ``clock`` are injectable for tests."""

    seconds: float = 300.0
    first_wait: float = 0.5
    longest_wait: float = 30.0
    sleep: Callable[[float], None] = time.sleep
    clock: Callable[[], float] = time.monotonic
    rng: random.Random = field(default_factory=random.Random)
    retried: int = 0  # calls retried so far (the launcher reports it)

    def wait(self, attempt: int, started: float, retry_after: float | None) -> bool:
        """Sleep before attempt ``attempt + 1``; False when the budget is spent."""
        wait = self.rng.uniform(0, min(self.longest_wait, self.first_wait * 2 ** attempt))
        if retry_after is not None:
            wait = max(wait, min(retry_after, self.longest_wait))
        if self.clock() + wait - started > self.seconds:
            return False
        self.retried += 1
        self.sleep(wait)
        return True


def _sdk():
    try:
        import kubernetes
    except ImportError as exc:
        raise ConfigError(INSTALL_HINT) from exc
    return kubernetes


def connect(context: str | None = None) -> KubeClient:
    """A client for the current cluster: kubeconfig first (a laptop: $KUBECONFIG or
    ~/.kube/config, optionally a named ``context``), else the pod's service account.

    Raises ConfigError (with both reasons) when neither works, or with an install hint
    when the ``kubernetes`` package is missing.
    """
    k8s = _sdk()
    reasons = []
    configuration = k8s.client.Configuration()
    try:
        # Read $KUBECONFIG now: the SDK reads it once, at import time.
        k8s.config.load_kube_config(config_file=os.environ.get("KUBECONFIG") or None,
                                    context=context, client_configuration=configuration)
        return KubeClient(k8s.client.ApiClient(configuration))
    except Exception as exc:  # the SDK raises several unrelated types here
        reasons.append(f"kubeconfig: {exc}")
    try:
        k8s.config.load_incluster_config(client_configuration=configuration)
        return KubeClient(k8s.client.ApiClient(configuration))
    except Exception as exc:
        reasons.append(f"in-cluster: {exc}")
    raise ConfigError("no Kubernetes cluster configured (" + "; ".join(reasons) + "); set "
                      "KUBECONFIG or run inside a pod with a service account")


def for_host(url: str) -> KubeClient:
    """A client for an API server at ``url`` without credentials (tests, emulators)."""
    k8s = _sdk()
    configuration = k8s.client.Configuration()
    configuration.host = url.rstrip("/")
    return KubeClient(k8s.client.ApiClient(configuration))


class KubeClient:
    """Namespaced calls the launcher makes, on plain dicts.

    Every call is retried under :attr:`retry` while the failure is passing (connection
    errors, 429, 5xx); then each method raises UnavailableError when the API server cannot
    be reached, and the SDK's ApiException for other API errors (callers check
    ``.status``).
    """

    def __init__(self, api_client: Any):
        k8s = _sdk()
        self.api_client = api_client
        self._apis = {name: getattr(k8s.client, name)(api_client)
                      for name in {api for api, _ in _KINDS.values()}}
        self.core = self._apis["CoreV1Api"]
        self.batch = self._apis["BatchV1Api"]
        self.ApiException = k8s.client.ApiException
        self._watch = k8s.watch.Watch
        self.retry = RetryPolicy()

    # -- generic objects --------------------------------------------------------------
    def _method(self, verb: str, kind: str):
        if kind in _CUSTOM:
            return self._custom_method(verb, kind)
        if kind not in _KINDS:
            raise ValueError(f"the launcher does not manage {kind} objects")
        api, suffix = _KINDS[kind]
        return getattr(self._apis[api], f"{verb}_namespaced_{suffix}")

    def _custom_method(self, verb: str, kind: str):
        """A custom resource's ``verb`` with the typed APIs' argument order: ``(namespace,
        body)`` to create, ``(name, namespace, ...)`` otherwise."""
        group, version, plural = _CUSTOM[kind]
        api = self._api("CustomObjectsApi")
        if verb == "create":
            return lambda namespace, body, **kw: api.create_namespaced_custom_object(
                group, version, namespace, plural, body, **kw)
        method = getattr(api, {"read": "get"}.get(verb, verb) + "_namespaced_custom_object")
        return lambda name, namespace, *args, **kw: method(group, version, namespace, plural,
                                                            name, *args, **kw)

    def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Create ``obj`` (Job, JobSet, ConfigMap, Service, Deployment, NetworkPolicy)."""
        namespace = obj["metadata"]["namespace"]
        return self._call(self._method("create", obj["kind"]), namespace, obj)

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        """The object, or None if it does not exist."""
        try:
            return self._call(self._method("read", kind), name, namespace)
        except self.ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def patch(self, kind: str, namespace: str, name: str,
              body: dict[str, Any]) -> dict[str, Any]:
        """Merge ``body`` into the object (a JSON merge patch: a list in ``body``
        replaces the object's list whole, None removes a field); a
        ``metadata.resourceVersion`` in it is a precondition (409 Conflict when the object
        changed since)."""
        # Said explicitly: the SDK would otherwise send a dict as a JSON Patch, which an
        # API server refuses (a JSON Patch is a list of operations).
        return self._call(self._method("patch", kind), name, namespace, body,
                          _content_type="application/merge-patch+json")

    def delete(self, kind: str, namespace: str, name: str) -> bool:
        """Delete with propagationPolicy Background (a Job's pods go too). False if absent."""
        try:
            self._call(self._method("delete", kind), name, namespace,
                       body={"propagationPolicy": "Background"})
            return True
        except self.ApiException as exc:
            if exc.status == 404:
                return False
            raise

    # -- jobs, pods, logs, events -----------------------------------------------------
    def list_jobs(self, namespace: str, selector: dict[str, str]) -> tuple[list[dict], str]:
        """``(jobs, resourceVersion)`` of the Jobs carrying every label in ``selector``."""
        data = self._call(self.batch.list_namespaced_job, namespace,
                          label_selector=_selector(selector))
        return _matching(data.get("items", []), selector), data["metadata"].get(
            "resourceVersion", "")

    def list_pods(self, namespace: str, selector: dict[str, str]) -> list[dict[str, Any]]:
        """Pods carrying every label in ``selector``, oldest first."""
        data = self._call(self.core.list_namespaced_pod, namespace,
                          label_selector=_selector(selector))
        pods = _matching(data.get("items", []), selector)
        return sorted(pods, key=lambda p: p["metadata"].get("creationTimestamp") or "")

    def pod_events(self, namespace: str, pod: str) -> list[dict[str, Any]]:
        """Events about one pod (scheduling, image pulls, volume mounts)."""
        data = self._call(self.core.list_namespaced_event, namespace,
                          field_selector=f"involvedObject.name={pod}")
        # Filter here too: some API servers (and emulators) ignore field selectors.
        return [e for e in data.get("items", [])
                if e.get("involvedObject", {}).get("name") == pod]

    def pod_log(self, namespace: str, pod: str, container: str) -> str:
        """The container's log so far ('' when it has not started)."""
        try:
            response = self._retrying(self.core.read_namespaced_pod_log, pod, namespace,
                                      container=container, _preload_content=False)
        except self.ApiException as exc:
            if exc.status in (400, 404):  # not started yet, or already gone
                return ""
            raise
        return response.data.decode("utf-8", "replace")

    def follow_log(self, namespace: str, pod: str, container: str) -> Iterator[str]:
        """The container's log lines as they are written, until it exits."""
        try:
            response = self._retrying(self.core.read_namespaced_pod_log, pod, namespace,
                                      container=container, follow=True,
                                      _preload_content=False)
        except self.ApiException as exc:
            if exc.status in (400, 404):
                return
            raise
        pending = b""
        for chunk in response.stream(4096):
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                yield line.decode("utf-8", "replace")
        if pending:
            yield pending.decode("utf-8", "replace")

    def watch_jobs(self, namespace: str, selector: dict[str, str], resource_version: str,
                   timeout_seconds: float) -> Iterator[tuple[str, dict[str, Any]]]:
        """``(event type, job)`` for changes after ``resource_version``, for at most
        ``timeout_seconds`` without an event.

        Raises WatchExpired on 410 Gone (list again and watch from the new version).
        """
        watch = self._watch()
        # timeout_seconds bounds the server's side; the read timeout bounds ours, so a
        # server that ignores the former (or a dead connection) cannot hang the launcher.
        kwargs = {"label_selector": _selector(selector),
                  "timeout_seconds": max(1, int(timeout_seconds)),
                  "_request_timeout": (10, timeout_seconds)}
        if resource_version:
            kwargs["resource_version"] = resource_version
        try:
            for event in watch.stream(self.batch.list_namespaced_job, namespace, **kwargs):
                obj = event.get("raw_object") or {}
                if event.get("type") == "ERROR":
                    if obj.get("code") == 410:
                        raise WatchExpired(obj.get("message", "410 Gone"))
                    raise UnavailableError(f"watch error: {obj.get('message', obj)}")
                if _matching([obj], selector):
                    yield event["type"], obj
        except self.ApiException as exc:
            if exc.status == 410:
                raise WatchExpired(str(exc.reason)) from exc
            raise
        except (WatchExpired, UnavailableError):
            raise
        except Exception as exc:
            if _is_timeout(exc):
                return
            raise _unavailable(exc) from exc
        finally:
            watch.stop()

    # -- diagnosis: what a stuck stage's Job and pods say (trackb_core.k8s.diagnose) ---
    def object_events(self, namespace: str, kind: str, name: str) -> list[dict[str, Any]]:
        """Events about one object of ``kind``, e.g. a Job's FailedCreate: why it has no
        pod (the pod was never made, so no pod event says it)."""
        data = self._call(self.core.list_namespaced_event, namespace,
                          field_selector=f"involvedObject.kind={kind},"
                                         f"involvedObject.name={name}")
        # Filter here too: some API servers (and emulators) ignore field selectors.
        return [e for e in data.get("items", [])
                if (e.get("involvedObject") or {}).get("kind") == kind
                and (e.get("involvedObject") or {}).get("name") == name]

    def previous_log(self, namespace: str, pod: str, container: str,
                     tail_lines: int | None = None) -> str:
        """The log of the container's previous run, the one that crashed ('' when it
        never restarted); its last ``tail_lines`` lines when given."""
        kwargs: dict[str, Any] = {"tail_lines": tail_lines} if tail_lines else {}
        try:
            response = self._retrying(self.core.read_namespaced_pod_log, pod, namespace,
                                      container=container, previous=True,
                                      _preload_content=False, **kwargs)
        except self.ApiException as exc:
            if exc.status in (400, 404):  # no previous run, or the pod is gone
                return ""
            raise
        return response.data.decode("utf-8", "replace")

    def list_workloads(self, namespace: str, owner_kind: str, owner: str,
                       owner_uid: str | None = None) -> list[dict[str, Any]] | None:
        """Kueue's Workloads owned by the ``owner_kind`` ``owner`` (its uid, when given,
        tells it from an earlier object of the same name); None when the API server does
        not serve Workloads (Kueue is not installed)."""
        group, version, plural = _CUSTOM["Workload"]
        try:
            data = self._call(self._api("CustomObjectsApi").list_namespaced_custom_object,
                              group, version, namespace, plural)
        except self.ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return [w for w in data.get("items", [])
                if any(ref.get("kind") == owner_kind and ref.get("name") == owner
                       and (not owner_uid or not ref.get("uid") or ref["uid"] == owner_uid)
                       for ref in (w.get("metadata") or {}).get("ownerReferences") or [])]

    # -- preflight: reads that check a run can start, creating nothing -----------------
    # kind -> (SDK API class, read method, namespaced)
    _READS = {
        "Secret": ("CoreV1Api", "read_namespaced_secret", True),
        "PersistentVolumeClaim": ("CoreV1Api", "read_namespaced_persistent_volume_claim", True),
        "PriorityClass": ("SchedulingV1Api", "read_priority_class", False),
        "RuntimeClass": ("NodeV1Api", "read_runtime_class", False),
    }

    def read(self, kind: str, name: str, namespace: str | None = None) -> dict | None:
        """A Secret, PersistentVolumeClaim or Kueue LocalQueue in ``namespace``, or a
        cluster-scoped PriorityClass or RuntimeClass; None if it does not exist (for a
        LocalQueue also when Kueue is not installed: both answer 404).

        Raises Forbidden on 403 (this identity may not read it).
        """
        if kind in _CUSTOM:
            call, args = self._custom_method("read", kind), (name, namespace)
        else:
            api, method, namespaced = self._READS[kind]
            call = getattr(self._api(api), method)
            args = (name, namespace) if namespaced else (name,)
        try:
            return self._call(call, *args)
        except self.ApiException as exc:
            if exc.status == 404:
                return None
            if exc.status == 403:
                raise Forbidden(f"get {kind} {name}: forbidden") from exc
            raise

    def list_nodes(self, selector: dict[str, str]) -> list[dict[str, Any]]:
        """Nodes carrying every label in ``selector``. Raises Forbidden on 403."""
        try:
            data = self._call(self.core.list_node, label_selector=_selector(selector))
        except self.ApiException as exc:
            if exc.status == 403:
                raise Forbidden("list nodes: forbidden") from exc
            raise
        return _matching(data.get("items", []), selector)

    def access_review(self, namespace: str, group: str, resource: str, verb: str,
                      name: str | None = None) -> bool:
        """Whether this identity may ``verb`` ``resource`` (``pods/log``: a subresource)
        in ``namespace``, or only the object ``name``: a SelfSubjectAccessReview, which
        creates nothing. Raises Forbidden on 403."""
        plural, _, subresource = resource.partition("/")
        attributes = {"namespace": namespace, "group": group, "resource": plural,
                      "verb": verb}
        if subresource:
            attributes["subresource"] = subresource
        if name:
            attributes["name"] = name
        review = {"apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectAccessReview",
                  "spec": {"resourceAttributes": attributes}}
        api = self._api("AuthorizationV1Api")
        try:
            data = self._call(api.create_self_subject_access_review, review)
        except self.ApiException as exc:
            if exc.status == 403:
                raise Forbidden("create selfsubjectaccessreviews: forbidden") from exc
            raise
        return bool(data.get("status", {}).get("allowed"))

    def _api(self, name: str) -> Any:
        if name not in self._apis:
            self._apis[name] = getattr(_sdk().client, name)(self.api_client)
        return self._apis[name]

    # -- plumbing ---------------------------------------------------------------------
    def _call(self, method, *args, **kwargs) -> dict[str, Any]:
        response = self._retrying(method, *args, _preload_content=False, **kwargs)
        return json.loads(response.data or b"{}")

    def _retrying(self, method, *args, **kwargs) -> Any:
        """``method(*args, **kwargs)``, retried under :attr:`retry` while it fails for a
        passing reason. Raises UnavailableError (connection), ApiException (other status),
        ConfigError (the SDK refused the request before sending it)."""
        started, attempt = self.retry.clock(), 0
        while True:
            try:
                return method(*args, **kwargs)
            except self.ApiException as exc:
                if exc.status not in RETRIED_STATUSES or not self.retry.wait(
                        attempt, started, _retry_after(exc)):
                    raise
            except (ValueError, TypeError) as exc:
                # The SDK checks bodies before sending: a bad manifest, not the network.
                raise ConfigError(f"the Kubernetes client rejected a request: {exc}") from exc
            except Exception as exc:
                if not self.retry.wait(attempt, started, None):
                    raise _unavailable(exc) from exc
            attempt += 1


def _selector(labels: dict[str, str]) -> str:
    return ",".join(f"{key}={value}" for key, value in sorted(labels.items()))


def _matching(items: list[dict[str, Any]], labels: dict[str, str]) -> list[dict[str, Any]]:
    # The API filters by label already; this guards against servers that do not.
    return [item for item in items
            if all(item.get("metadata", {}).get("labels", {}).get(k) == v
                   for k, v in labels.items())]


def _retry_after(exc: Any) -> float | None:
    try:
        return float((exc.headers or {}).get("Retry-After"))
    except (TypeError, ValueError):
        return None


def _is_timeout(exc: Exception) -> bool:
    text = f"{type(exc).__name__} {exc}"
    return "timed out" in text.lower() or "Timeout" in text


def _unavailable(exc: Exception) -> UnavailableError:
    host = os.environ.get("KUBERNETES_SERVICE_HOST", "the API server")
    return UnavailableError(f"cannot reach Kubernetes ({host}): {exc}")


def wait_deleted(client: KubeClient, kind: str, namespace: str, name: str,
                 seconds: float = 60.0) -> None:
    """Block until ``name`` is gone. Raises UnavailableError if it outlives ``seconds``."""
    deadline = time.monotonic() + seconds
    while client.get(kind, namespace, name) is not None:
        if time.monotonic() > deadline:
            raise UnavailableError(f"{kind} {name} is still being deleted after {seconds:.0f}s")
        time.sleep(0.1)
