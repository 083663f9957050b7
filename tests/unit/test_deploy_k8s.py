"""Every Kubernetes manifest validates offline against the Kubernetes schemas, overlays included;
migrations, autoscaling, the broker and its access fit together.

The overlays are rendered here by a small kustomize of our own (the features k8s/ uses), because
kubectl may be missing where the tests run; where it exists, the two renderings must agree.
"""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from services.scheduler.app import PREFETCH as SCHEDULER_PREFETCH
from shared.settings import Settings
from shared.topology import WORK_QUEUES

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
OVERLAYS = ("dev", "prod")
KUBERNETES_VERSION = "1.33.0"
# Custom resources of operators; their schemas are not in kubernetes-validate.
CUSTOM_KINDS = {
    "RabbitmqCluster": "rabbitmq.com/v1beta1",
    "Vhost": "rabbitmq.com/v1beta1",
    "User": "rabbitmq.com/v1beta1",
    "Permission": "rabbitmq.com/v1beta1",
    "PodMonitor": "monitoring.coreos.com/v1",
    "PrometheusRule": "monitoring.coreos.com/v1",
    "ScaledObject": "keda.sh/v1alpha1",
    "TriggerAuthentication": "keda.sh/v1alpha1",
}
CLUSTER_SCOPED = {"Namespace"}
SETTINGS_VARIABLES = {name.upper() for name in Settings.model_fields}
# Not settings: the parts of RABBITMQ_URL, from the broker user's generated Secret.
URL_PARTS = {"RABBITMQ_USERNAME", "RABBITMQ_PASSWORD"}
USER_SECRET = "followups-user-credentials"
SERVICES = ("scheduler", "personalizer", "dispatcher")
AUTOSCALED = {"followups-scheduler", "followups-personalizer"}

Doc = dict[str, Any]


def load_all(path: Path) -> list[Doc]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def merge(base: Any, patch: Any) -> Any:
    """Strategic merge, as far as k8s/ needs it: maps merge, named lists merge by name."""
    if isinstance(base, dict) and isinstance(patch, dict):
        merged = dict(base)
        for key, value in patch.items():
            merged[key] = merge(base[key], value) if key in base else copy.deepcopy(value)
        return merged
    if isinstance(base, list) and isinstance(patch, list) and _named(base) and _named(patch):
        merged_list = [copy.deepcopy(item) for item in base]
        names = [item["name"] for item in merged_list]
        for item in patch:
            if item["name"] in names:
                at = names.index(item["name"])
                merged_list[at] = merge(merged_list[at], item)
            else:
                merged_list.append(copy.deepcopy(item))
        return merged_list
    return copy.deepcopy(patch)


def _named(items: list[Any]) -> bool:
    return bool(items) and all(isinstance(i, dict) and "name" in i for i in items)


def _pod(doc: Doc) -> Doc:
    spec = doc.get("spec", {})
    return spec.get("jobTemplate", {}).get("spec", spec).get("template", {}).get("spec", {})


def _containers(doc: Doc) -> list[Doc]:
    pod = _pod(doc)
    return [*pod.get("initContainers", []), *pod.get("containers", [])]


def render(directory: Path) -> list[Doc]:
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    docs: list[Doc] = []
    for entry in kustomization.get("resources", []):
        path = directory / entry
        docs.extend(render(path) if path.is_dir() else load_all(path))
    for patch_entry in kustomization.get("patches", []):
        for patch in load_all(directory / patch_entry["path"]):
            kind = patch_entry.get("target", {}).get("kind")
            for i, doc in enumerate(docs):
                matches = (
                    doc["kind"] == kind
                    if kind
                    else (doc["kind"], doc["metadata"]["name"])
                    == (patch["kind"], patch["metadata"]["name"])
                )
                if matches:
                    targeted = copy.deepcopy(patch)
                    targeted["metadata"] = doc["metadata"]
                    docs[i] = merge(doc, targeted)
    for label in kustomization.get("labels", []):
        for doc in docs:
            doc["metadata"].setdefault("labels", {}).update(label["pairs"])
    if "namespace" in kustomization:
        for doc in docs:
            if doc["kind"] not in CLUSTER_SCOPED:
                doc["metadata"]["namespace"] = kustomization["namespace"]
    for image in kustomization.get("images", []):
        for doc in docs:
            for container in _containers(doc):
                name, _, tag = container["image"].partition(":")
                if name == image["name"]:
                    container["image"] = (
                        f"{image.get('newName', name)}:{image.get('newTag', tag or 'latest')}"
                    )
    for replicas in kustomization.get("replicas", []):
        for doc in docs:
            if doc["kind"] == "Deployment" and doc["metadata"]["name"] == replicas["name"]:
                doc["spec"]["replicas"] = replicas["count"]
    return docs


def _key(doc: Doc) -> tuple[str, str]:
    return doc["kind"], doc["metadata"]["name"]


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request) -> tuple[str, list[Doc]]:
    return request.param, render(K8S / "overlays" / request.param)


def ours(docs: list[Doc], kind: str) -> list[Doc]:
    return [
        d
        for d in docs
        if d["kind"] == kind
        and d["metadata"]["name"].startswith("followups-")
        and "postgres" not in d["metadata"]["name"]
    ]


def test_every_manifest_file_parses_and_validates():
    files = sorted(K8S.rglob("*.yaml"))
    assert len(files) > 10
    for path in files:
        if path.name == "kustomization.yaml":
            continue
        for doc in load_all(path):
            if doc["kind"] in CUSTOM_KINDS:
                continue
            if path.parent.name in OVERLAYS and doc["kind"] != "Namespace":
                continue  # patches are partial by nature; checked once rendered
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_rendered_overlay_validates(overlay):
    name, docs = overlay
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "ServiceAccount", "ConfigMap", "PodDisruptionBudget"} <= kinds
    assert {"ScaledObject", "TriggerAuthentication", "RabbitmqCluster", "Namespace"} <= kinds
    assert {"Vhost", "User", "Permission"} <= kinds
    # Neither a migration Job (the init containers migrate) nor a CPU autoscaler (KEDA scales).
    assert not {"Job", "HorizontalPodAutoscaler"} & kinds
    for doc in docs:
        if doc["kind"] in CUSTOM_KINDS:
            assert doc["apiVersion"] == CUSTOM_KINDS[doc["kind"]]
            assert doc["spec"]
            continue
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    namespaces = {d["metadata"].get("namespace") for d in docs if d["kind"] != "Namespace"}
    assert namespaces == {next(d for d in docs if d["kind"] == "Namespace")["metadata"]["name"]}
    print(f"\n{name}: {len(docs)} resources valid against Kubernetes {KUBERNETES_VERSION}")


@pytest.mark.skipif(
    shutil.which("kubectl") is None,
    reason="kubectl not on this machine: only the cross-check with `kubectl kustomize` is skipped",
)
def test_our_rendering_matches_kubectl_kustomize(overlay):
    name, docs = overlay
    result = subprocess.run(
        ["kubectl", "kustomize", str(K8S / "overlays" / name)],
        capture_output=True,
        text=True,
        check=True,
    )
    theirs = {_key(d): d for d in yaml.safe_load_all(result.stdout) if d}
    assert theirs == {_key(d): d for d in docs}


def test_services_are_hardened_and_probed(overlay):
    _, docs = overlay
    deployments = ours(docs, "Deployment")
    assert {d["metadata"]["name"] for d in deployments} == {
        "followups-scheduler",
        "followups-personalizer",
        "followups-dispatcher",
    }
    for workload in [*deployments, *ours(docs, "Job"), *ours(docs, "CronJob")]:
        pod = _pod(workload)
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        assert pod["automountServiceAccountToken"] is False
        service_accounts = {sa["metadata"]["name"] for sa in ours(docs, "ServiceAccount")}
        assert pod["serviceAccountName"] in service_accounts
        for container in pod["containers"]:
            security = container["securityContext"]
            assert security["readOnlyRootFilesystem"] is True
            assert security["allowPrivilegeEscalation"] is False
            assert security["capabilities"]["drop"] == ["ALL"]
            assert set(container["resources"]) == {"requests", "limits"}
    config = next(d for d in docs if d["metadata"]["name"] == "followups-config")["data"]
    for deployment in deployments:
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        assert container["ports"][0]["containerPort"] == int(config["HTTP_PORT"])
        assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
        annotations = deployment["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/port"] == config["HTTP_PORT"]


def test_disruption_budgets_and_autoscalers(overlay):
    _, docs = overlay
    budgets = {
        d["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"]: d["spec"]
        for d in docs
        if d["kind"] == "PodDisruptionBudget"
    }
    deployments = {d["metadata"]["name"]: d for d in ours(docs, "Deployment")}
    assert set(budgets) >= set(deployments)
    for name in deployments:
        # Right for any replica count an autoscaler picks, and never blocks a drain.
        assert budgets[name] == {"maxUnavailable": 1, "selector": budgets[name]["selector"]}
    scaled = {d["spec"]["scaleTargetRef"]["name"]: d["spec"] for d in ours(docs, "ScaledObject")}
    # The send rate limit is global: more dispatchers never send faster.
    assert set(scaled) == AUTOSCALED
    for name, deployment in deployments.items():
        # An apply would reset what the autoscaler chose.
        assert ("replicas" in deployment["spec"]) == (name not in AUTOSCALED), name
    assert deployments["followups-dispatcher"]["spec"]["replicas"] >= 1
    for spec in scaled.values():
        assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]


def test_the_dispatchers_cpu_is_reserved_and_never_throttled(overlay):
    _, docs = overlay
    (dispatcher,) = [
        d for d in ours(docs, "Deployment") if d["metadata"]["name"].endswith("dispatcher")
    ]
    (container,) = _pod(dispatcher)["containers"]
    resources = container["resources"]
    # A CFS quota spent early in its period would hold every due send until the next period.
    assert "cpu" not in resources["limits"]
    assert "memory" in resources["limits"]
    cpu = resources["requests"]["cpu"]
    millicores = int(cpu[:-1]) if cpu.endswith("m") else int(float(cpu) * 1000)
    assert millicores >= 500


def test_scalers_read_the_depth_of_the_queue_each_service_consumes(overlay):
    _, docs = overlay
    namespace = next(d for d in docs if d["kind"] == "Namespace")["metadata"]["name"]
    config = next(d for d in docs if d["metadata"]["name"] == "followups-config")["data"]
    (auth,) = [d for d in docs if d["kind"] == "TriggerAuthentication"]
    assert {(r["parameter"], r["name"], r["key"]) for r in auth["spec"]["secretTargetRef"]} == {
        ("username", USER_SECRET, "username"),
        ("password", USER_SECRET, "password"),
    }
    (vhost,) = [d["spec"]["name"] for d in docs if d["kind"] == "Vhost"]
    queues = {work.name for work in WORK_QUEUES}
    per_replica = {
        "followups-scheduler": SCHEDULER_PREFETCH,
        "followups-personalizer": int(
            config.get(
                "PERSONALIZE_CONCURRENCY", Settings.model_fields["personalize_concurrency"].default
            )
        ),
    }
    consumed = {
        "followups-scheduler": "followups.scheduler.inbox",
        "followups-personalizer": "followups.personalizer.due",
    }
    for scaled in ours(docs, "ScaledObject"):
        target = scaled["spec"]["scaleTargetRef"]["name"]
        (trigger,) = scaled["spec"]["triggers"]
        assert trigger["type"] == "rabbitmq"
        assert trigger["authenticationRef"]["name"] == auth["metadata"]["name"]
        metadata = trigger["metadata"]
        assert metadata["queueName"] == consumed[target]
        assert metadata["queueName"] in queues
        assert metadata["vhostName"] == vhost
        assert metadata["mode"] == "QueueLength"
        assert int(metadata["value"]) == per_replica[target], target
        # Read from KEDA's namespace: the Service by its full name, on the management port.
        assert metadata["protocol"] == "http"
        assert metadata["host"] == f"http://followups-rabbitmq.{namespace}.svc:15672/"


def test_every_service_migrates_before_it_starts(overlay):
    _, docs = overlay
    for deployment in ours(docs, "Deployment"):
        pod = _pod(deployment)
        (init,) = pod["initContainers"]
        (service,) = pod["containers"]
        assert init["command"] == ["/bin/sh", "-c", "followups migrate && followups declare"]
        assert init["image"] == service["image"]
        assert init["envFrom"] == service["envFrom"]
        assert init["env"] == service["env"]
        security = init["securityContext"]
        assert security["readOnlyRootFilesystem"] is True
        assert security["allowPrivilegeEscalation"] is False
        assert set(init["resources"]) == {"requests", "limits"}


def test_services_reach_the_broker_as_their_own_user_in_their_vhost(overlay):
    _, docs = overlay
    (vhost,) = [d for d in docs if d["kind"] == "Vhost"]
    (user,) = [d for d in docs if d["kind"] == "User"]
    (permission,) = [d for d in docs if d["kind"] == "Permission"]
    (cluster,) = [d for d in docs if d["kind"] == "RabbitmqCluster"]
    for doc in (vhost, user, permission):
        assert doc["spec"]["rabbitmqClusterReference"]["name"] == cluster["metadata"]["name"]
    assert vhost["spec"]["deletionPolicy"] == "retain"
    assert permission["spec"]["vhost"] == vhost["spec"]["name"]
    assert permission["spec"]["userReference"]["name"] == user["metadata"]["name"]
    # The topology operator names the generated Secret after the User.
    assert f"{user['metadata']['name']}-user-credentials" == USER_SECRET
    for deployment in ours(docs, "Deployment"):
        for container in _containers(deployment):
            env = {e["name"]: e for e in container["env"]}
            for part, key in (("RABBITMQ_USERNAME", "username"), ("RABBITMQ_PASSWORD", "password")):
                assert env[part]["valueFrom"]["secretKeyRef"] == {"name": USER_SECRET, "key": key}
            assert env["RABBITMQ_URL"]["value"] == (
                "amqp://$(RABBITMQ_USERNAME):$(RABBITMQ_PASSWORD)"
                f"@{cluster['metadata']['name']}:5672/{vhost['spec']['name']}"
            )
            # Kubernetes expands $(VAR) only for variables defined before it.
            names = [e["name"] for e in container["env"]]
            assert names.index("RABBITMQ_URL") > max(names.index(p) for p in URL_PARTS)


def test_the_broker_runs_the_current_4x_series_everywhere():
    images = {
        overlay: next(
            d for d in render(K8S / "overlays" / overlay) if d["kind"] == "RabbitmqCluster"
        )["spec"]["image"]
        for overlay in OVERLAYS
    }
    dockerfile = (ROOT / "deploy/rabbitmq/Dockerfile").read_text()
    (compose_version,) = re.findall(r"^ARG RABBITMQ_VERSION=(\S+)$", dockerfile, re.MULTILINE)
    for image in images.values():
        assert image == f"rabbitmq:{compose_version}-management"
    assert compose_version.startswith("4.")


def test_prod_broker_survives_a_node_or_zone_loss():
    docs = render(K8S / "overlays" / "prod")
    (cluster,) = [d for d in docs if d["kind"] == "RabbitmqCluster"]
    spec = cluster["spec"]
    assert spec["resources"]["requests"] == spec["resources"]["limits"]
    selector = {"app.kubernetes.io/name": cluster["metadata"]["name"]}
    (budget,) = [
        d
        for d in docs
        if d["kind"] == "PodDisruptionBudget" and d["spec"]["selector"]["matchLabels"] == selector
    ]
    assert budget["spec"]["maxUnavailable"] == 1
    pod = spec["override"]["statefulSet"]["spec"]["template"]["spec"]
    (zones,) = pod["topologySpreadConstraints"]
    assert zones["topologyKey"] == "topology.kubernetes.io/zone"
    assert zones["whenUnsatisfiable"] == "DoNotSchedule"
    assert zones["labelSelector"]["matchLabels"] == selector
    hosts = spec["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert hosts[0]["topologyKey"] == "kubernetes.io/hostname"


def test_prod_runs_quorum_queues_on_three_rabbitmq_nodes():
    docs = render(K8S / "overlays" / "prod")
    cluster = next(d for d in docs if d["kind"] == "RabbitmqCluster")
    assert cluster["spec"]["replicas"] == 3
    assert "default_queue_type = quorum" in cluster["spec"]["rabbitmq"]["additionalConfig"]
    config = next(d for d in docs if d["metadata"]["name"] == "followups-config")["data"]
    assert config["DELAY_QUEUE_TYPE"] == "quorum"


def _env_names(docs: list[Doc]) -> set[str]:
    names: set[str] = set()
    for doc in docs:
        if doc["kind"] == "ConfigMap" and doc["metadata"]["name"] == "followups-config":
            names |= set(doc["data"])
        if doc["kind"] == "Secret" and doc["metadata"]["name"] == "followups-secrets":
            names |= set(doc.get("stringData", {})) | set(doc.get("data", {}))
        for container in _containers(doc):
            if "followups" in container.get("image", ""):
                names |= {env["name"] for env in container.get("env", [])}
    return names - URL_PARTS


def test_kubernetes_sets_only_variables_the_settings_know(overlay):
    _, docs = overlay
    template = load_all(K8S / "base" / "secret.template.yaml")
    names = _env_names([*docs, *template])
    assert names
    assert names <= SETTINGS_VARIABLES, names - SETTINGS_VARIABLES
    assert {"DATABASE_URL", "RABBITMQ_URL"} <= names


def test_prod_prunes_the_audit_tables_once_a_day():
    docs = render(K8S / "overlays" / "prod")
    (cron,) = ours(docs, "CronJob")
    assert _containers(cron)[0]["command"] == ["followups", "prune", "--older-than", "90d"]
    assert _containers(cron)[0]["image"].startswith("registry.example.com/followups:")
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    assert len(cron["spec"]["schedule"].split()) == 5


def test_secret_template_holds_placeholders_only():
    (secret,) = load_all(K8S / "base" / "secret.template.yaml")
    for key, value in secret["stringData"].items():
        assert "CHANGE-ME" in value or "example" in value, key
