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
import time
from collections.abc import Iterator
from typing import Any

from trackb_core.errors import ConfigError, UnavailableError

# (API group, resource) -> verbs the launcher uses. The chart's Role must grant exactly
# these (tests compare them); no wildcards, no Secrets.
RBAC_RULES: dict[tuple[str, str], frozenset[str]] = {
    ("batch", "jobs"): frozenset({"create", "get", "list", "watch", "delete"}),
    ("", "pods"): frozenset({"list"}),
    ("", "pods/log"): frozenset({"get"}),
    ("", "events"): frozenset({"list"}),
    ("", "services"): frozenset({"create", "get", "delete"}),
    ("apps", "deployments"): frozenset({"create", "get", "delete"}),
    ("networking.k8s.io", "networkpolicies"): frozenset({"create", "get", "delete"}),
    ("", "configmaps"): frozenset({"create", "get", "delete"}),
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
}


class WatchExpired(Exception):
    """The watch's resourceVersion is too old (HTTP 410 Gone): list again, then watch."""


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

    Every method raises UnavailableError when the API server cannot be reached, and
    the SDK's ApiException for other API errors (callers check ``.status``).
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

    # -- generic objects --------------------------------------------------------------
    def _method(self, verb: str, kind: str):
        if kind not in _KINDS:
            raise ValueError(f"the launcher does not manage {kind} objects")
        api, suffix = _KINDS[kind]
        return getattr(self._apis[api], f"{verb}_namespaced_{suffix}")

    def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Create ``obj`` (Job, ConfigMap, Service, Deployment, NetworkPolicy)."""
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
            response = self.core.read_namespaced_pod_log(
                pod, namespace, container=container, _preload_content=False)
        except self.ApiException as exc:
            if exc.status in (400, 404):  # not started yet, or already gone
                return ""
            raise
        except Exception as exc:
            raise _unavailable(exc) from exc
        return response.data.decode("utf-8", "replace")

    def follow_log(self, namespace: str, pod: str, container: str) -> Iterator[str]:
        """The container's log lines as they are written, until it exits."""
        try:
            response = self.core.read_namespaced_pod_log(
                pod, namespace, container=container, follow=True, _preload_content=False)
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

    # -- plumbing ---------------------------------------------------------------------
    def _call(self, method, *args, **kwargs) -> dict[str, Any]:
        try:
            response = method(*args, _preload_content=False, **kwargs)
        except self.ApiException:
            raise
        except (ValueError, TypeError) as exc:
            # The SDK checks bodies before sending: a bad manifest, not a network problem.
            raise ConfigError(f"the Kubernetes client rejected a request: {exc}") from exc
        except Exception as exc:
            raise _unavailable(exc) from exc
        return json.loads(response.data or b"{}")


def _selector(labels: dict[str, str]) -> str:
    return ",".join(f"{key}={value}" for key, value in sorted(labels.items()))


def _matching(items: list[dict[str, Any]], labels: dict[str, str]) -> list[dict[str, Any]]:
    # The API filters by label already; this guards against servers that do not.
    return [item for item in items
            if all(item.get("metadata", {}).get("labels", {}).get(k) == v
                   for k, v in labels.items())]


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
