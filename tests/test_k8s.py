"""The Kubernetes manifests (deploy/k8s): every overlay renders with ``kubectl kustomize`` and every object
validates strictly against the Kubernetes schemas; the custom resources carry the fields we rely on; and the
properties that matter hold: probes on paths the real server answers, the admin endpoints behind the Secret's
key, the autoscaler's metric made by the adapter rule from metrics the real server exports, the plan Job
writing where the servers read, non-root containers on read-only root filesystems, and grace periods that
cover the server's exit timeout. A broken field fails (the negative control)."""

from __future__ import annotations

import copy
import ipaddress
import re
import shutil
import subprocess
import sys
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from satseg.server.triton import RESTRICTED_APIS, TritonServer

yaml = pytest.importorskip("yaml")
kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="needs the dev extra (kubernetes-validate)")

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = ("gpu", "cpu", "kserve")
BATCH = "batch"
"""The sharded sat-client Indexed Job (deploy/k8s/batch), rendered and validated like the overlays."""
PACS = "pacs"
"""sat-dicom-node's StatefulSet (deploy/k8s/pacs), rendered and validated like the overlays."""
VIEWER = "viewer"
"""The OHIF viewer's Deployment (deploy/k8s/viewer), rendered and validated like the overlays."""
APPS = (BATCH, PACS, VIEWER)
KUBERNETES_VERSION = "1.32.0"
"""The oldest Kubernetes the manifests support (kubectl here is 1.32)."""
ADAPTER_RULES = K8S / "monitoring" / "prometheus-adapter-rules.yaml"
CUSTOM_RESOURCE_FIELDS = {
    # kind: the paths (dotted; a list's first item) this project relies on, checked where no schema is bundled.
    "ServiceMonitor": ("spec.selector.matchLabels", "spec.endpoints.port", "spec.endpoints.path"),
    "InferenceService": ("spec.predictor.model.modelFormat.name", "spec.predictor.model.storageUri"),
}


Rendered = dict[str, list[dict[str, Any]]]
"""Overlay name -> its rendered objects."""


def render(overlay: str) -> list[dict[str, Any]]:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed: it renders the kustomize overlays")
    folder = K8S / overlay if overlay in APPS else K8S / "overlays" / overlay
    rendered = subprocess.run(["kubectl", "kustomize", str(folder)], capture_output=True, text=True, check=True).stdout
    return [document for document in yaml.safe_load_all(rendered) if document]


@pytest.fixture(scope="module")
def rendered() -> Rendered:
    return {overlay: render(overlay) for overlay in (*OVERLAYS, *APPS)}


def problems(document: dict[str, Any]) -> list[str]:
    """Why ``document`` is not a valid object: a strict schema validation, or the relied-on fields of a CRD."""
    try:
        kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)
        return []
    except kubernetes_validate.SchemaNotFoundError:
        required = CUSTOM_RESOURCE_FIELDS.get(document["kind"])
        if required is None:
            return [f"{document['kind']}: no schema and no known fields"]
        return [f"{document['kind']}: no {path}" for path in required if field(document, path) is None]
    except kubernetes_validate.ValidationError as error:
        return [f"{document['kind']} {document['metadata']['name']}: {error.message}"]


def field(document: Any, path: str) -> Any:
    for key in path.split("."):
        if isinstance(document, list):
            document = document[0] if document else None
        if not isinstance(document, dict):
            return None
        document = document.get(key)
    return document


def kinds(documents: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [document for document in documents if document["kind"] == kind]


def pod_templates(documents: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        document["spec"]["template"]["spec"]
        for document in documents
        if document["kind"] in ("Deployment", "Job", "StatefulSet")
    ]


def server(documents: list[dict[str, Any]]) -> dict[str, Any]:
    (deployment,) = kinds(documents, "Deployment")
    return deployment["spec"]["template"]["spec"]


def environment(container: dict[str, Any]) -> dict[str, str]:
    return {item["name"]: item["value"] for item in container.get("env", [])}


@pytest.mark.parametrize("overlay", (*OVERLAYS, *APPS))
def test_every_object_of_every_overlay_validates_strictly(rendered: Rendered, overlay: str) -> None:
    documents = rendered[overlay]
    assert documents
    assert [problem for document in documents for problem in problems(document)] == []


def test_a_broken_field_fails_validation(rendered: Rendered) -> None:
    """The negative control: a misspelt field and a wrong type are both caught."""
    (deployment,) = kinds(rendered["gpu"], "Deployment")
    misspelt = copy.deepcopy(deployment)
    misspelt["spec"]["template"]["spec"]["containers"][0]["securityContext"]["readOnlyRootFileSystem"] = True
    mistyped = copy.deepcopy(deployment)
    mistyped["spec"]["replicas"] = "two"
    assert problems(deployment) == []
    assert problems(misspelt) and problems(mistyped)
    service_monitor = copy.deepcopy(kinds(rendered["gpu"], "ServiceMonitor")[0])
    del service_monitor["spec"]["endpoints"][0]["port"]
    assert problems(service_monitor) == ["ServiceMonitor: no spec.endpoints.port"]


def test_the_probes_ask_what_the_real_server_answers_on_its_http_port(
    rendered: Rendered, triton_server: TritonServer
) -> None:
    """Readiness and the CPU liveness are HTTP paths the server answers 200; the GPU liveness is one real tiny
    inference (``sat-serve --check``), run here as the pod would, against the test server."""
    for overlay in ("gpu", "cpu"):
        (container,) = server(rendered[overlay])["containers"]
        http = next(port["containerPort"] for port in container["ports"] if port["name"] == "http")
        assert http == 8000  # tritonserver's default, which the sat-triton entrypoint keeps
        probes = [container[name] for name in ("startupProbe", "readinessProbe", "livenessProbe")]
        for probe in probes:
            if "httpGet" in probe:
                assert probe["httpGet"]["port"] == "http"
                path = probe["httpGet"]["path"]
                assert path in ("/v2/models/sat/ready", "/v2/health/live")
                with urllib.request.urlopen(f"http://{triton_server.triton_http_url}{path}", timeout=10) as answer:
                    assert answer.status == 200, path
        assert container["readinessProbe"]["httpGet"]["path"] == "/v2/models/sat/ready"
    (cpu,) = server(rendered["cpu"])["containers"]
    assert cpu["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    (gpu,) = server(rendered["gpu"])["containers"]
    command = gpu["livenessProbe"]["exec"]["command"]
    assert command[:4] == ["python3", "-m", "satseg.cli.serve", "--check"] and command[4] == f"http://127.0.0.1:{http}"
    here = [sys.executable, *command[1:4], f"http://{triton_server.triton_http_url}", *command[5:]]
    assert subprocess.run(here, capture_output=True, timeout=120).returncode == 0


def test_the_admin_endpoints_need_the_key_from_the_secret(rendered: Rendered) -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert f"apis={','.join(RESTRICTED_APIS)}\n" in dockerfile  # what the entrypoint restricts
    for overlay in ("gpu", "cpu"):
        pod = server(rendered[overlay])
        (container,) = pod["containers"]
        key_file = environment(container)["SAT_ADMIN_KEY_FILE"]
        mount = next(m for m in container["volumeMounts"] if key_file.startswith(m["mountPath"] + "/"))
        volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
        assert volume["secret"]["secretName"] == "sat-admin-key" and mount["readOnly"]
        assert "--http-restricted-api" not in str(container.get("args", []))  # no key on the command line
        (service,) = kinds(rendered[overlay], "Service")
        assert sorted(port["port"] for port in service["spec"]["ports"]) == [8000, 8001, 8002]


def test_only_client_namespaces_reach_inference_and_only_monitoring_reaches_metrics(
    rendered: Rendered,
) -> None:
    for overlay in OVERLAYS:
        (policy,) = kinds(rendered[overlay], "NetworkPolicy")
        reach = {
            tuple(sorted(port["port"] for port in rule["ports"])): rule["from"][0]["namespaceSelector"]["matchLabels"]
            for rule in policy["spec"]["ingress"]
        }
        assert reach == {
            (8000, 8001): {"sat.example.org/client": "true"},
            (8002,): {"kubernetes.io/metadata.name": "monitoring"},
        }


def test_the_autoscaler_metric_is_made_by_the_adapter_rule_from_metrics_the_server_exports(
    rendered: Rendered, triton_server: TritonServer
) -> None:
    (rule,) = yaml.safe_load(ADAPTER_RULES.read_text())["rules"]["custom"]
    for overlay in ("gpu", "cpu"):
        (autoscaler,) = kinds(rendered[overlay], "HorizontalPodAutoscaler")
        (metric,) = autoscaler["spec"]["metrics"]
        assert metric["pods"]["metric"]["name"] == rule["name"]["as"]
        assert autoscaler["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] >= 600
    used = set(re.findall(r"\b(nv_[a-z_]+)\{", rule["metricsQuery"]))
    assert used == {"nv_inference_queue_duration_us", "nv_inference_request_success"}
    with urllib.request.urlopen(triton_server.metrics_url, timeout=10) as response:
        exported = response.read().decode()
    for name in used:
        assert re.search(rf'^{name}\{{[^}}]*model="sat"', exported, re.MULTILINE), name


def test_the_plan_job_writes_the_repository_the_servers_mount_read_only(
    rendered: Rendered,
) -> None:
    documents = rendered["gpu"]
    (job,) = kinds(documents, "Job")
    job_pod = job["spec"]["template"]["spec"]
    (exporter,) = job_pod["containers"]
    output = exporter["args"][exporter["args"].index("-o") + 1]
    assert "--tensorrt" in exporter["args"]
    written = next(m for m in exporter["volumeMounts"] if m["mountPath"] == output)
    assert not written.get("readOnly", False)
    claim = next(v for v in job_pod["volumes"] if v["name"] == written["name"])["persistentVolumeClaim"]["claimName"]
    pod = server(documents)
    (container,) = pod["containers"]
    read = next(
        m for m in container["volumeMounts"] if m["mountPath"] == environment(container)["SAT_MODEL_REPOSITORY"]
    )
    assert read["readOnly"]
    assert next(v for v in pod["volumes"] if v["name"] == read["name"])["persistentVolumeClaim"]["claimName"] == claim
    assert job_pod["nodeSelector"] == pod["nodeSelector"]  # plans load only on the GPU class they were built on
    assert [pvc["metadata"]["name"] for pvc in kinds(documents, "PersistentVolumeClaim")] == [claim]


def test_containers_run_as_non_root_on_read_only_root_filesystems(rendered: Rendered) -> None:
    for overlay in ("gpu", "cpu", *APPS):
        for pod in pod_templates(rendered[overlay]):
            assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] != 0
            for container in pod["containers"]:
                context = container["securityContext"]
                assert context["readOnlyRootFilesystem"] and not context["allowPrivilegeEscalation"]
                assert context["capabilities"]["drop"] == ["ALL"]


def test_gpus_only_where_asked_and_grace_periods_cover_the_exit_timeout(
    rendered: Rendered,
) -> None:
    for overlay, gpus in (("gpu", "1"), ("cpu", None)):
        pod = server(rendered[overlay])
        (container,) = pod["containers"]
        assert container["resources"]["limits"].get("nvidia.com/gpu") == gpus
        assert pod["terminationGracePeriodSeconds"] > int(environment(container)["SAT_EXIT_TIMEOUT_S"])
        shm = next(v for v in pod["volumes"] if v["name"] == "shm")
        assert shm["emptyDir"]["medium"] == "Memory"
    assert environment(server(rendered["cpu"])["containers"][0])["SAT_MODEL_CONFIG"] == "openvino"
    assert (ROOT / "triton_repo" / "vision" / "configs" / "openvino.pbtxt").is_file()


def test_the_batch_job_runs_every_shard_once_against_the_service(rendered: Rendered) -> None:
    """Completion index i runs ``--shard i+1/N`` with N the completions, writing where the output volume is
    mounted, against the Service's gRPC port, with a task sat-client knows."""
    from satseg_clients.folder_run import Shard
    from satseg_clients.tasks import task

    (job,) = kinds(rendered[BATCH], "Job")
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    (container,) = spec["template"]["spec"]["containers"]
    script = container["args"][0]
    words = script.split()
    shard = re.search(r'--shard "([^"]+)"', script)[1]  # type: ignore[index]
    assert shard == f"$((JOB_COMPLETION_INDEX + 1))/{spec['completions']}"
    for index in range(spec["completions"]):  # what the shell makes of it in each pod
        Shard.parse(shard.replace("$((JOB_COMPLETION_INDEX + 1))", str(index + 1)))
    output = words[words.index("-o") + 1]
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == output)
    assert not mount.get("readOnly", False)
    assert words[words.index("--url") + 1] == "sat-triton:8001"
    assert task(words[words.index("--task") + 1]).prompts
    (server_overlay,) = kinds(rendered["gpu"], "Service")
    assert server_overlay["metadata"]["name"] == "sat-triton"


def test_the_dicom_node_config_in_the_cluster_loads_and_matches_its_pod(rendered: Rendered) -> None:
    """The ConfigMap's TOML is a valid node config whose data folder is the pod's volume, whose SCP and metrics
    ports are the Service's, and whose Triton URL is the sat-triton Service's gRPC port."""
    from satseg_clients.dicom_node.config import from_document, tomllib

    documents = rendered[PACS]
    (config_map,) = kinds(documents, "ConfigMap")
    config = from_document(tomllib.loads(config_map["data"]["dicom_node.toml"]), Path("/"))
    (stateful_set,) = kinds(documents, "StatefulSet")
    pod = stateful_set["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert mounts[str(config.data_dir)] == stateful_set["spec"]["volumeClaimTemplates"][0]["metadata"]["name"]
    config_folder = Path(container["command"][container["command"].index("--config") + 1]).parent
    assert (
        next(v for v in pod["volumes"] if v["name"] == mounts[str(config_folder)])["configMap"]["name"]
        == (config_map["metadata"]["name"])
    )
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert (ports["dimse"], ports["metrics"]) == (config.receive.port, config.metrics_port)
    assert config.metrics_host == config.receive.host == "0.0.0.0"  # a pod is reached on its own address
    (service,) = kinds(documents, "Service")
    assert {port["targetPort"] for port in service["spec"]["ports"]} == set(ports)
    assert config.segment.triton_urls == ("sat-triton.sat.svc.cluster.local:8001",)
    (namespace,) = kinds(documents, "Namespace")
    assert namespace["metadata"]["labels"]["sat.example.org/client"] == "true"  # admitted by sat-triton's policy
    assert stateful_set["spec"]["replicas"] == 1  # one writer of the SQLite job database


def test_the_viewer_serves_the_demo_s_config_and_gets_every_site_variable(rendered: Rendered) -> None:
    """The viewer's pod mounts app-config.js and the nginx site from files the demo's viewer uses too, its
    environment sets every ``${VARIABLE}`` of the site, and its NetworkPolicy lets it reach the PACS's port."""
    from satseg_clients.viewer import APP_CONFIG

    documents = rendered[VIEWER]
    (deployment,) = kinds(documents, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    maps = {document["metadata"]["name"]: document for document in kinds(documents, "ConfigMap")}
    secrets = {document["metadata"]["name"]: document for document in kinds(documents, "Secret")}
    environment_keys = set()
    for source in container["envFrom"]:
        if "configMapRef" in source:
            environment_keys |= set(maps[source["configMapRef"]["name"]]["data"])
        else:
            environment_keys |= set(secrets[source["secretRef"]["name"]]["data"])
    files = {
        mount["mountPath"]: next(volume for volume in pod["volumes"] if volume["name"] == mount["name"])
        for mount in container["volumeMounts"]
    }
    config_map = maps[files["/usr/share/nginx/html/app-config.js"]["configMap"]["name"]]
    assert config_map["data"]["app-config.js"] == APP_CONFIG.read_text()
    site = config_map["data"][files["/etc/nginx/templates"]["configMap"]["items"][0]["key"]]
    assert set(re.findall(r"\$\{(\w+)\}", site)) == environment_keys == {"PACS_DICOMWEB_URL", "PACS_AUTHORIZATION"}
    pacs = urllib.parse.urlsplit(maps[container["envFrom"][0]["configMapRef"]["name"]]["data"]["PACS_DICOMWEB_URL"])
    (policy,) = kinds(documents, "NetworkPolicy")
    assert any(
        pacs.port in [port["port"] for port in rule["ports"]] and ipaddress.ip_address(pacs.hostname) in network
        for rule in policy["spec"]["egress"]
        for network in [ipaddress.ip_network(peer["ipBlock"]["cidr"]) for peer in rule["to"] if "ipBlock" in peer]
    )
    assert {port["port"] for rule in policy["spec"]["ingress"] for port in rule["ports"]} == {8080}
