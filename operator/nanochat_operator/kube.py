"""The operator's API calls, on the official kubernetes client: the writes and the few reads the
watches do not cover (`watched.py` reads the rest from kopf's indexes).

Calls ask for the raw JSON (`_preload_content=False`) and hand plain camelCase dicts to
the pure modules, exactly as the API server sent them: no model classes in between,
and no deserialisation cost per call. API errors are sorted here:

    409 on create         -> AlreadyExists   (fine: made earlier)
    409 on status patch   -> Conflict        (computed from a stale copy: look again)
    400/422 on create     -> Rejected        (permanent: the run fails with the message)
    anything else         -> kopf.TemporaryError with a delay (the worker retries; no hot loop)
"""

from __future__ import annotations

import json
import socket
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import httpx
import kopf
from kubernetes import client
from kubernetes import config as kconfig
from kubernetes.client.exceptions import ApiException

from nanochat_trainer.contract import GROUP, VERSION

from .reconcile import AlreadyExists, Rejected

EVENT_SOURCE = "nanochat-operator"
CUSTOM_PLURALS = {"PodGroup": "podgroups"}  # kinds created through the custom-objects API


class Conflict(Exception):
    """An optimistic-concurrency write found the object changed."""


def _message(err: ApiException) -> str:
    try:
        return json.loads(err.body or "{}").get("message") or str(err.reason)
    except ValueError:
        return str(err.reason)


def temporary(err: Exception) -> kopf.TemporaryError:
    """A retryable error with a delay that grows with how unlikely a quick fix is."""
    if isinstance(err, ApiException):
        if err.status == 403:
            return kopf.TemporaryError(f"forbidden: {_message(err)} (check the operator's RBAC)", delay=120)
        if err.status == 429:
            return kopf.TemporaryError("API server throttling", delay=30)
        return kopf.TemporaryError(f"API error {err.status}: {_message(err)}", delay=15)
    return kopf.TemporaryError(f"{type(err).__name__}: {err}", delay=15)


class KubeCluster:
    def __init__(self, api_client: client.ApiClient, scrape_timeout: float = 2.0) -> None:
        self.core = client.CoreV1Api(api_client)
        self.batch = client.BatchV1Api(api_client)
        self.networking = client.NetworkingV1Api(api_client)
        self.custom = client.CustomObjectsApi(api_client)
        # The built-in kinds it creates: (create, read) each; a found one is read back (`_stored`).
        self._kinds: dict[str, tuple[Callable[..., Any], Callable[..., Any]]] = {
            "ConfigMap": (self.core.create_namespaced_config_map, self.core.read_namespaced_config_map),
            "Service": (self.core.create_namespaced_service, self.core.read_namespaced_service),
            "PersistentVolumeClaim": (
                self.core.create_namespaced_persistent_volume_claim,
                self.core.read_namespaced_persistent_volume_claim,
            ),
            "Job": (self.batch.create_namespaced_job, self.batch.read_namespaced_job),
            "NetworkPolicy": (
                self.networking.create_namespaced_network_policy,
                self.networking.read_namespaced_network_policy,
            ),
        }
        self.instance = socket.gethostname()  # the operator pod: events say which replica wrote them
        # One pooled HTTP client for trainer scrapes; short timeouts so a dead pod cannot
        # hold a worker thread.
        self.http = httpx.Client(timeout=scrape_timeout)

    @staticmethod
    def _json(call: Callable[..., Any], *args: Any, **kwargs: Any) -> dict[str, Any]:
        resp = call(*args, _preload_content=False, **kwargs)
        return json.loads(resp.data)

    def _stored(self, obj: dict[str, Any]) -> dict[str, Any] | None:
        """The stored object of `obj`'s kind and name (None when it is gone again). Any other
        error (RBAC, the API server) raises, retried: "cannot tell" is not "gone"."""
        meta = obj["metadata"]
        try:
            if obj["kind"] in CUSTOM_PLURALS:
                group, version = obj["apiVersion"].split("/")
                plural = CUSTOM_PLURALS[obj["kind"]]
                return self._json(
                    self.custom.get_namespaced_custom_object, group, version, meta["namespace"], plural, meta["name"]
                )
            return self._json(self._kinds[obj["kind"]][1], meta["name"], meta["namespace"])
        except ApiException as err:
            if err.status == 404:
                return None
            raise temporary(err) from err

    def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Create `obj`; the object as the API server stored it."""
        ns = obj["metadata"]["namespace"]
        try:
            if obj["kind"] in CUSTOM_PLURALS:  # a gang scheduler's PodGroup
                group, version = obj["apiVersion"].split("/")
                return self._json(
                    self.custom.create_namespaced_custom_object, group, version, ns, CUSTOM_PLURALS[obj["kind"]], obj
                )
            return self._json(self._kinds[obj["kind"]][0], ns, obj)
        except ApiException as err:
            if err.status == 409:  # an earlier attempt's, or a deleted run's not yet collected: whose is it?
                raise AlreadyExists(obj["metadata"]["name"], existing=self._stored(obj)) from err
            if err.status in (400, 422):
                raise Rejected(f"{obj['kind']} {obj['metadata']['name']}: {_message(err)}") from err
            if err.status == 404 and obj["kind"] in CUSTOM_PLURALS:
                raise Rejected(
                    f"{obj['kind']} {obj['metadata']['name']}: this cluster does not serve {obj['apiVersion']} "
                    "(is the gang scheduler that spec.gang names installed?)"
                ) from err
            raise temporary(err) from err

    def patch_job(self, namespace: str, name: str, spec: dict[str, Any]) -> None:
        try:
            # Explicit content type: the client would otherwise pick JSON Patch for a dict body.
            self.batch.patch_namespaced_job(
                name,
                namespace,
                {"spec": spec},
                _preload_content=False,
                _content_type="application/merge-patch+json",
            )
        except ApiException as err:
            raise temporary(err) from err

    def patch_status(self, plural: str, namespace: str, name: str, version: str, status: dict[str, Any]) -> bool:
        """Merge `status` into a run's status, only if the run is still at resourceVersion `version`
        (else Conflict: the status was computed from a stale copy). False: the run is gone."""
        body = {"metadata": {"resourceVersion": version}, "status": status}
        try:
            self.custom.patch_namespaced_custom_object_status(
                GROUP, VERSION, namespace, plural, name, body,
                _preload_content=False, _content_type="application/merge-patch+json",
            )  # fmt: skip
        except ApiException as err:
            if err.status == 409:
                raise Conflict(f"{plural} {namespace}/{name} changed since {version}") from err
            if err.status == 404:
                return False
            raise temporary(err) from err
        return True

    def post_event(self, obj: dict[str, Any], type: str, reason: str, message: str) -> None:
        """A core/v1 Event about a run, as `kubectl describe` and `kubectl get events` show them."""
        meta = obj["metadata"]
        now = datetime.now(UTC)
        seconds, micro = now.strftime("%Y-%m-%dT%H:%M:%SZ"), now.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        event = {
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": {
                "apiVersion": obj["apiVersion"],
                "kind": obj["kind"],
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta.get("uid"),
            },
            "type": type,
            "reason": reason,
            "message": message[:1024],
            "action": reason,
            "firstTimestamp": seconds,
            "lastTimestamp": seconds,
            # Microseconds: a run's phases can follow each other within one second, and only
            # eventTime keeps their order (the timestamps above are whole seconds).
            "eventTime": micro,
            "source": {"component": EVENT_SOURCE},
            "reportingComponent": EVENT_SOURCE,
            "reportingInstance": self.instance,
        }
        try:
            self.core.create_namespaced_event(meta["namespace"], event, _preload_content=False)
        except ApiException as err:
            raise temporary(err) from err

    def pod_create_failure(self, namespace: str, job_name: str) -> tuple[str, str] | None:
        """(message, when) of the Job controller's newest FailedCreate event for the Job: why its
        pods cannot be made (admission, Pod Security, quota). Events are the only place it says."""
        try:
            events = (
                self._json(
                    self.core.list_namespaced_event,
                    namespace,
                    field_selector=f"involvedObject.kind=Job,involvedObject.name={job_name},reason=FailedCreate",
                ).get("items")
                or []
            )
        except ApiException as err:
            raise temporary(err) from err
        timed = [(e.get("lastTimestamp") or e.get("eventTime") or "", e.get("message") or "") for e in events]
        if not timed:
            return None
        when, message = max(timed)
        return message, when

    def scrape(self, url: str) -> str | None:
        """A trainer's /metrics text; None when it does not answer (starting, or no network)."""
        try:
            resp = self.http.get(url)
            return resp.text if resp.status_code == 200 else None
        except (httpx.HTTPError, httpx.InvalidURL):  # InvalidURL is no HTTPError; a bad URL must not fail reconciles
            return None


def load_api_client(max_workers: int) -> client.ApiClient:
    """In-cluster credentials when running in a pod, else ~/.kube/config."""
    try:
        kconfig.load_incluster_config()
    except kconfig.ConfigException:
        kconfig.load_kube_config()
    configuration = client.Configuration.get_default_copy()
    # A connection per handler thread, so threads never queue for a socket.
    configuration.connection_pool_maxsize = max(max_workers, 4)
    return client.ApiClient(configuration)
