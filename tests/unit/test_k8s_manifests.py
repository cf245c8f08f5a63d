"""deploy/k8s: every Kustomize overlay renders (kubectl kustomize, offline), every object
of a built-in kind passes the Kubernetes 1.30 JSON schemas in strict mode
(kubernetes-validate), and what the manifests and Dockerfiles say about ports, probes,
paths, the ensemble and the launcher's flags agrees with the code that serves it:
launcher.tritonserver.DEFAULT_PORTS, builder.repository.ENSEMBLE/MODELS and
launcher.parse_args. No cluster, no container engine."""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from builder.repository import ENSEMBLE, MODELS
from client.health import build_parser as health_parser
from launcher.cli import parse_args
from launcher.tritonserver import DEFAULT_PORTS, PROJECT_ROOT

DEPLOY = PROJECT_ROOT / "deploy"
K8S = DEPLOY / "k8s"
KUBERNETES_VERSION = "1.30"
OVERLAYS = {
    "cpu": K8S / "overlays" / "cpu",
    "gpu": K8S / "overlays" / "gpu",
    "kserve": K8S / "kserve",
    "kserve-canary": K8S / "kserve" / "canary",
}
BUILT_IN = {
    ("v1", "Service"),
    ("apps/v1", "Deployment"),
    ("autoscaling/v2", "HorizontalPodAutoscaler"),
    ("policy/v1", "PodDisruptionBudget"),
}
CRDS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
    ("serving.kserve.io/v1alpha1", "ServingRuntime"),
    ("serving.kserve.io/v1beta1", "InferenceService"),
}
HEALTH_READY = "/v2/health/ready"
# TritonServer.stop gives tritonserver its exit timeout plus this before it kills it.
LAUNCHER_STOP_MARGIN_S = 10
# Where KServe's storage initializer and modelcars put the model.
KSERVE_MODEL_DIR = "/mnt/models"


def _kustomize(path: Path) -> list[dict]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not on PATH: deploy/k8s was NOT rendered or checked (install kubectl to run these tests)")
    out = subprocess.run([kubectl, "kustomize", str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"kubectl kustomize {path} failed:\n{out.stderr}"
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {name: _kustomize(path) for name, path in OVERLAYS.items()}


def _one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def _server(doc: dict) -> dict:
    containers = doc["spec"]["template"]["spec"]["containers"]
    return next(c for c in containers if c["name"] == "tritonserver")


def _clean_env(monkeypatch) -> None:
    for var in [v for v in os.environ if v.startswith("CAPTIONER_")]:
        monkeypatch.delenv(var)


# PID 1 in the serving containers: it reaps the stubs orphaned when tritonserver dies (the
# launcher as PID 1 left them zombies: tests/containers) and passes SIGTERM on.
INIT = ["tini", "--"]


def _launcher_args(container: dict, monkeypatch) -> object:
    """The container's args as the launcher reads them, under the container's environment."""
    assert container["command"] == INIT + ["python", "-m", "launcher"]
    _clean_env(monkeypatch)
    for var in container.get("env", []):
        monkeypatch.setenv(var["name"], var["value"])
    return parse_args(container["args"])


def _pod_ports(monkeypatch) -> dict[str, int]:
    """Every port the launcher listens on by default: Triton's three and the supervisor's exporter."""
    _clean_env(monkeypatch)
    return {**DEFAULT_PORTS, "supervisor": parse_args([]).supervisor_metrics_port}


def _matches(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


SERVING = ("cpu", "gpu")


# -- render and schemas ------------------------------------------------------------------


def test_every_overlay_renders_the_expected_objects(rendered):
    for name in SERVING:
        kinds = sorted((d["kind"], d["metadata"]["name"]) for d in rendered[name])
        assert kinds == [
            ("Deployment", "captioner"),
            ("HorizontalPodAutoscaler", "captioner"),
            ("PodDisruptionBudget", "captioner"),
            ("PrometheusRule", "captioner"),
            ("Service", "captioner"),
            ("Service", "captioner-headless"),
            ("Service", "captioner-metrics"),
            ("ServiceMonitor", "captioner"),
        ], name
    assert sorted(d["kind"] for d in rendered["kserve"]) == ["InferenceService", "ServingRuntime"]
    assert sorted(d["kind"] for d in rendered["kserve-canary"]) == ["InferenceService", "ServingRuntime"]
    for name, docs in rendered.items():
        for d in docs:
            assert (d["apiVersion"], d["kind"]) in BUILT_IN | CRDS, f"{name}: unexpected {d['apiVersion']} {d['kind']}"


def test_built_in_objects_pass_the_kubernetes_1_30_schemas_strictly(rendered):
    validated = 0
    for name, docs in rendered.items():
        for d in docs:
            if (d["apiVersion"], d["kind"]) not in BUILT_IN:
                continue
            try:
                assert kubernetes_validate.validate(d, KUBERNETES_VERSION, strict=True) == KUBERNETES_VERSION
            except kubernetes_validate.ValidationError as e:
                path = ".".join(str(p) for p in e.path)
                pytest.fail(f"{name}: {d['kind']}/{d['metadata']['name']} at {path}: {e.message}")
            validated += 1
    assert validated == 2 * 6  # Deployment, 3 Services, HPA, PDB in each serving overlay


def test_the_schema_check_rejects_a_misspelt_field_and_a_wrong_type(rendered):
    """Strict means strict: a field the API does not know is an error, not ignored."""
    dep = _one(rendered["cpu"], "Deployment")
    typo = copy.deepcopy(dep)
    server = _server(typo)
    server["livenessprobe"] = server.pop("livenessProbe")
    with pytest.raises(kubernetes_validate.ValidationError, match="livenessprobe"):
        kubernetes_validate.validate(typo, KUBERNETES_VERSION, strict=True)
    wrong = copy.deepcopy(dep)
    wrong["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = "60"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(wrong, KUBERNETES_VERSION, strict=True)


# -- one source of truth: ports, probes, launcher flags ----------------------------------


@pytest.mark.parametrize("overlay", SERVING)
def test_container_ports_services_and_probes_use_the_launchers_ports(rendered, overlay, monkeypatch):
    _clean_env(monkeypatch)
    docs = rendered[overlay]
    dep = _one(docs, "Deployment")
    server = _server(dep)
    ports = {p["name"]: p["containerPort"] for p in server["ports"]}
    pod_ports = _pod_ports(monkeypatch)
    assert ports == pod_ports
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    assert _matches(dep["spec"]["selector"]["matchLabels"], pod_labels)

    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    for svc in services.values():
        assert _matches(svc["spec"]["selector"], pod_labels), svc["metadata"]["name"]
        for p in svc["spec"]["ports"]:
            assert p["port"] == pod_ports[p["name"]] == ports[p["targetPort"]], (svc["metadata"]["name"], p)
    assert {p["name"] for p in services["captioner"]["spec"]["ports"]} == {"grpc", "http"}
    headless = services["captioner-headless"]["spec"]
    assert headless["clusterIP"] == "None" and "grpc" in {p["name"] for p in headless["ports"]}
    assert not headless.get("publishNotReadyAddresses", False)
    assert [p["name"] for p in services["captioner-metrics"]["spec"]["ports"]] == ["metrics", "supervisor"]

    for probe in ("startupProbe", "readinessProbe"):
        get = server[probe]["httpGet"]
        assert get["path"] == HEALTH_READY and ports[get["port"]] == DEFAULT_PORTS["http"], probe
    live = server["livenessProbe"]["exec"]["command"]
    # client.health, not `client health`: the subcommand form depends on the working
    # directory (a folder named `health` there would be captioned instead).
    assert live[:3] == ["python", "-m", "client.health"]
    probe = health_parser().parse_args(live[3:])
    assert probe.url == f"127.0.0.1:{DEFAULT_PORTS['grpc']}" and probe.model_name == ENSEMBLE
    assert probe.overload_ok  # a pod that sheds load is alive: restarting it deepens the overload
    assert server["livenessProbe"]["timeoutSeconds"] > probe.timeout


@pytest.mark.parametrize("overlay", SERVING)
def test_the_launcher_accepts_the_container_args_and_they_match_the_pod(rendered, overlay, monkeypatch):
    dep = _one(rendered[overlay], "Deployment")
    spec = dep["spec"]["template"]["spec"]
    server = _server(dep)
    a = _launcher_args(server, monkeypatch)
    assert a.no_build and a.supervise and a.samples == 0 and a.replicas == 1
    assert a.host == "0.0.0.0"
    ports = {p["name"]: p["containerPort"] for p in server["ports"]}
    launcher_ports = {"http": a.http_port, "grpc": a.grpc_port, "metrics": a.metrics_port}
    assert {**launcher_ports, "supervisor": a.supervisor_metrics_port} == ports
    mounts = {m["mountPath"]: m for m in server["volumeMounts"]}
    assert a.repo in mounts and mounts[a.repo]["readOnly"]
    writable = [Path(m) for m, mount in mounts.items() if not mount.get("readOnly")]
    # tritonserver's log goes to stdout (`kubectl logs`): the root filesystem is read-only.
    assert a.log_file == "-"
    assert Path("/tmp") in writable, "the root filesystem is read-only: Python and the backend need a writable /tmp"

    # The kubelet's SIGKILL must not cut the drain short: preStop, then Triton's drain,
    # then the launcher's wait before it kills a hung server.
    pre_stop = server["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    assert spec["terminationGracePeriodSeconds"] > int(pre_stop[1]) + a.drain_timeout + LAUNCHER_STOP_MARGIN_S
    # The startup probe waits at least as long as the launcher does before giving up.
    startup = server["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= a.startup_timeout


def test_the_gpu_overlay_asks_for_one_gpu_and_the_cpu_overlay_for_none(rendered):
    gpu = _server(_one(rendered["gpu"], "Deployment"))["resources"]
    cpu = _server(_one(rendered["cpu"], "Deployment"))["resources"]
    assert gpu["limits"]["nvidia.com/gpu"] == 1
    assert "nvidia.com/gpu" not in cpu.get("limits", {}) and "nvidia.com/gpu" not in cpu.get("requests", {})
    for res in (gpu, cpu):
        assert res["requests"]["cpu"] and res["requests"]["memory"] == res["limits"]["memory"]


@pytest.mark.parametrize("overlay", SERVING)
def test_every_container_runs_unprivileged(rendered, overlay):
    spec = _one(rendered[overlay], "Deployment")["spec"]["template"]["spec"]
    pod = spec["securityContext"]
    assert pod["runAsNonRoot"] is True and pod["runAsUser"] != 0
    assert spec["automountServiceAccountToken"] is False
    for c in spec["containers"] + spec["initContainers"]:
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"], c["name"]
        assert sc.get("runAsUser", pod["runAsUser"]) != 0


# -- the model repository's way into the pod ---------------------------------------------


def _dockerfile(name: str) -> str:
    return (DEPLOY / name).read_text()


def _repository_image_dir() -> str:
    copy_line = re.search(r"^COPY \$\{REPO\}/ (\S+)$", _dockerfile("Dockerfile.repository"), re.M)
    assert copy_line, "Dockerfile.repository must COPY ${REPO}/ to the image's repository folder"
    return copy_line[1].rstrip("/")


def test_the_repository_image_is_built_from_where_the_builder_writes(monkeypatch):
    _clean_env(monkeypatch)
    default_repo = re.search(r"^ARG REPO=(\S+)$", _dockerfile("Dockerfile.repository"), re.M)[1]
    assert default_repo == parse_args([]).repo  # the launcher's and `make build-engines`' default
    makefile = (PROJECT_ROOT / "Makefile").read_text()
    assert re.search(rf"^REPO \?= {re.escape(default_repo)}$", makefile, re.M)


@pytest.mark.parametrize("overlay", SERVING)
def test_the_init_container_lays_the_repository_out_where_the_launcher_looks(rendered, overlay, tmp_path, monkeypatch):
    """Runs the init container's own command (paths moved under tmp) on a tree shaped like
    builder.repository's output: every model must land directly under --repo."""
    dep = _one(rendered[overlay], "Deployment")
    spec = dep["spec"]["template"]["spec"]
    (init,) = spec["initContainers"]
    a = _launcher_args(_server(dep), monkeypatch)
    image_dir = _repository_image_dir()
    init_mount = next(m["mountPath"] for m in init["volumeMounts"] if m["name"] == "models")
    server_mount = next(m for m in _server(dep)["volumeMounts"] if m["mountPath"] == a.repo)
    assert server_mount["name"] == "models"
    assert any(v["name"] == "models" and "emptyDir" in v for v in spec["volumes"])

    image_root, pod_root = tmp_path / "image", tmp_path / "pod"
    for model in MODELS:
        (image_root / image_dir.lstrip("/") / model / "1").mkdir(parents=True)
        (image_root / image_dir.lstrip("/") / model / "config.pbtxt").write_text(f'name: "{model}"\n')
    (pod_root / init_mount.lstrip("/")).mkdir(parents=True)

    def relocate(arg: str) -> str:
        if arg.startswith(init_mount):
            return str(pod_root) + arg
        if arg.startswith(image_dir):
            return str(image_root) + arg
        return arg

    subprocess.run([relocate(x) for x in init["command"]], check=True, timeout=30)
    served = pod_root / a.repo.lstrip("/")
    assert sorted(p.name for p in served.iterdir()) == sorted(MODELS)
    assert (served / ENSEMBLE / "config.pbtxt").is_file()  # what TritonServer.start checks


# -- autoscaling, disruption, monitoring -------------------------------------------------


def _adapter_rule() -> dict:
    values = yaml.safe_load((K8S / "prometheus-adapter" / "values.yaml").read_text())
    (rule,) = values["rules"]["custom"]
    return rule


def _seconds(duration: str) -> int:
    m = re.fullmatch(r"(\d+)([sm])", duration)
    assert m, duration
    return int(m[1]) * (60 if m[2] == "m" else 1)


def test_the_adapter_rule_measures_queue_time_per_ensemble_request():
    rule = _adapter_rule()
    assert rule["seriesQuery"].startswith("nv_inference_queue_duration_us{")
    q = " ".join(rule["metricsQuery"].split())
    # The composing models' queues (the ensemble has none of its own), over 30 s ...
    assert f'increase(nv_inference_queue_duration_us{{<<.LabelMatchers>>,model!="{ENSEMBLE}"}}[30s])' in q
    # ... per successful request of the ensemble, over the same 30 s.
    assert (
        f'/ (1 + sum by (<<.GroupBy>>) (increase(nv_inference_request_success{{<<.LabelMatchers>>,model="{ENSEMBLE}"}}[30s])))'
        in q
    )
    assert rule["resources"]["overrides"]["pod"]["resource"] == "pod"


@pytest.mark.parametrize("overlay", SERVING)
def test_the_autoscaler_scales_the_deployment_on_the_adapters_metric(rendered, overlay):
    docs = rendered[overlay]
    dep, hpa, pdb = _one(docs, "Deployment"), _one(docs, "HorizontalPodAutoscaler"), _one(docs, "PodDisruptionBudget")
    ref = hpa["spec"]["scaleTargetRef"]
    assert (ref["apiVersion"], ref["kind"], ref["name"]) == (dep["apiVersion"], "Deployment", dep["metadata"]["name"])
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    assert metric["pods"]["metric"]["name"] == _adapter_rule()["name"]["as"]
    assert metric["pods"]["target"]["type"] == "AverageValue" and int(metric["pods"]["target"]["averageValue"]) > 0
    spec = hpa["spec"]
    assert 2 <= spec["minReplicas"] < spec["maxReplicas"]
    # A drain never takes the last serving pod.
    assert _matches(pdb["spec"]["selector"]["matchLabels"], dep["spec"]["template"]["metadata"]["labels"])
    assert pdb["spec"]["maxUnavailable"] < spec["minReplicas"]


@pytest.mark.parametrize("overlay", SERVING)
def test_the_service_monitor_scrapes_both_exporters_often_enough_for_the_rule(rendered, overlay, monkeypatch):
    """Not schema-validated (a CRD): its selector, port and interval are checked here."""
    docs = rendered[overlay]
    sm = _one(docs, "ServiceMonitor")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    scraped = [
        d for d in docs if d["kind"] == "Service" and _matches(sm["spec"]["selector"]["matchLabels"], d["metadata"]["labels"])
    ]
    assert [s["metadata"]["name"] for s in scraped] == ["captioner-metrics"]  # each pod scraped once
    pod_ports = _pod_ports(monkeypatch)
    endpoints = sm["spec"]["endpoints"]
    assert [e["port"] for e in endpoints] == ["metrics", "supervisor"]  # Triton's, then the launcher's
    window = int(re.search(r"\[(\d+)s\]", _adapter_rule()["metricsQuery"])[1])
    for endpoint in endpoints:
        port = next(p for p in scraped[0]["spec"]["ports"] if p["name"] == endpoint["port"])
        assert port["port"] == pod_ports[endpoint["port"]] and endpoint["path"] == "/metrics"
        assert 2 * _seconds(endpoint["interval"]) <= window  # increase() needs two samples in the window


# -- KServe (CRDs: not schema-validated; the fields we rely on are) ----------------------


def test_the_kserve_runtime_serves_the_repository_with_the_launcher(rendered, monkeypatch):
    docs = rendered["kserve"]
    runtime, isvc = _one(docs, "ServingRuntime"), _one(docs, "InferenceService")
    assert runtime["apiVersion"] == "serving.kserve.io/v1alpha1" and isvc["apiVersion"] == "serving.kserve.io/v1beta1"
    (container,) = runtime["spec"]["containers"]
    assert container["name"] == "kserve-container"
    a = _launcher_args(container, monkeypatch)
    assert a.no_build and a.supervise and a.samples == 0 and a.host == "0.0.0.0"
    assert a.repo == KSERVE_MODEL_DIR
    (port,) = container["ports"]
    assert port["name"] == "h2c" and port["containerPort"] == a.grpc_port == DEFAULT_PORTS["grpc"]
    for probe in ("startupProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": HEALTH_READY, "port": a.http_port}
    live = container["livenessProbe"]["exec"]["command"]
    assert live[:3] == ["python", "-m", "client.health"]
    probe = health_parser().parse_args(live[3:])
    assert probe.url == f"127.0.0.1:{a.grpc_port}" and probe.overload_ok
    assert container["securityContext"]["runAsNonRoot"] is True

    model = isvc["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    formats = {(f["name"], f["version"]) for f in runtime["spec"]["supportedModelFormats"]}
    assert (model["modelFormat"]["name"], model["modelFormat"]["version"]) in formats
    assert model["protocolVersion"] in runtime["spec"]["protocolVersions"]
    assert re.match(r"^(oci|s3|gs|pvc|https?)://", model["storageUri"])
    assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "RawDeployment"


def test_the_kserve_canary_sends_a_share_of_the_traffic_to_a_new_repository_image(rendered, monkeypatch):
    """kserve/canary: the same runtime and InferenceService with a new model on a share of
    the traffic. KServe splits traffic between revisions in Serverless mode only, where
    Knative probes the one served port."""
    base = {d["kind"]: d for d in rendered["kserve"]}
    canary = {d["kind"]: d for d in rendered["kserve-canary"]}
    isvc, old = canary["InferenceService"], base["InferenceService"]
    assert isvc["metadata"]["name"] == old["metadata"]["name"]  # a new revision of the same service
    assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "Serverless"
    predictor = isvc["spec"]["predictor"]
    assert 0 < predictor["canaryTrafficPercent"] < 100
    new_uri, old_uri = predictor["model"]["storageUri"], old["spec"]["predictor"]["model"]["storageUri"]
    assert new_uri != old_uri and new_uri.rsplit(":", 1)[0] == old_uri.rsplit(":", 1)[0]  # another tag of the image
    assert {k: v for k, v in predictor["model"].items() if k != "storageUri"} == {
        k: v for k, v in old["spec"]["predictor"]["model"].items() if k != "storageUri"
    }
    (container,) = canary["ServingRuntime"]["spec"]["containers"]
    (port,) = container["ports"]
    assert "startupProbe" not in container
    assert container["readinessProbe"]["tcpSocket"]["port"] == port["containerPort"]  # the served port
    a = _launcher_args(container, monkeypatch)
    assert a.repo == KSERVE_MODEL_DIR and a.grpc_port == port["containerPort"]
    assert container["livenessProbe"] == base["ServingRuntime"]["spec"]["containers"][0]["livenessProbe"]


# -- images -------------------------------------------------------------------------------


def _cmd(dockerfile: str) -> list[str]:
    m = re.search(r"^CMD (\[.*\])$", dockerfile, re.M)
    assert m, "CMD in exec form"
    return yaml.safe_load(m[1])


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cpu"])
def test_the_serving_images_run_the_launcher_unprivileged_on_the_pods_paths(name, rendered, monkeypatch):
    text = _dockerfile(name)
    cmd = _cmd(text)
    assert cmd[:3] == ["python", "-m", "launcher"]
    _clean_env(monkeypatch)
    a = parse_args(cmd[3:])
    assert a.no_build and a.host == "0.0.0.0" and a.samples == 0
    assert a.repo == KSERVE_MODEL_DIR == _launcher_args(_server(_one(rendered["cpu"], "Deployment")), monkeypatch).repo
    assert re.search(r"^USER 1000:1000$", text, re.M)
    exposed = re.search(r"^EXPOSE (.*)$", text, re.M)[1].split()
    assert exposed == [str(p) for p in sorted(_pod_ports(monkeypatch).values())]
    # The Python models import captioner; the liveness probe runs the client package.
    for package in ("captioner", "client"):
        assert re.search(rf"^COPY {package}/ {package}/$", text, re.M), package
    assert "deploy/requirements-serving.txt" in text
    entrypoint = yaml.safe_load(re.search(r"^ENTRYPOINT (\[.*\])$", text, re.M)[1])
    assert entrypoint[:2] == INIT and re.search(r"apt-get install .*\btini\b", text)
    assert re.search(r"^\s+PYTHONUNBUFFERED=1", text, re.M)
    pod_user = _one(rendered["cpu"], "Deployment")["spec"]["template"]["spec"]["securityContext"]["runAsUser"]
    assert pod_user == 1000


# -- /dev/shm, the grace period and the pod's constraints ------------------------------------


def _shm_for_default_builds() -> int:
    """builder.shm's size for the default builds: every target and CPU layout, the most."""
    from builder.build_engines import DEFAULT_MAX_BATCH
    from builder.repository import DECODER_STEP, DEFAULT_INSTANCES, ENCODER, GENERATOR, PREPROCESS
    from builder.shm import ShmLimits, required_bytes
    from captioner.preprocess import DEFAULT_MAX_BYTES

    python_models = {
        ("cpu", "fused"): (PREPROCESS, DECODER_STEP, GENERATOR),
        ("cpu", "split"): (PREPROCESS, ENCODER, DECODER_STEP, GENERATOR),
        ("gpu", "split"): (PREPROCESS, GENERATOR),
    }  # TensorRT encoder, onnxruntime step
    return max(
        required_bytes(
            ShmLimits(
                DEFAULT_MAX_BATCH,
                DEFAULT_MAX_BYTES,
                DEFAULT_INSTANCES[target][PREPROCESS],
                sum(DEFAULT_INSTANCES[target][m] for m in models),
            )
        )
        for (target, _), models in python_models.items()
    )


def _volume(volumes: list[dict], mounts: list[dict], path: str) -> dict:
    name = next(m["name"] for m in mounts if m["mountPath"] == path)
    return next(v for v in volumes if v["name"] == name)


def _pods(rendered) -> list[tuple[str, dict, list[dict]]]:
    """(where, container, volumes) of every serving pod the manifests define."""
    out = []
    for overlay in SERVING:
        spec = _one(rendered[overlay], "Deployment")["spec"]["template"]["spec"]
        out.append((overlay, _server(_one(rendered[overlay], "Deployment")), spec["volumes"]))
    for overlay in ("kserve", "kserve-canary"):
        runtime = _one(rendered[overlay], "ServingRuntime")["spec"]
        out.append((overlay, runtime["containers"][0], runtime["volumes"]))
    return out


def test_dev_shm_is_what_the_build_sizes_for_full_batches_of_the_largest_images(rendered):
    from builder.shm import quantity

    want = quantity(_shm_for_default_builds())
    for where, container, volumes in _pods(rendered):
        shm = _volume(volumes, container["volumeMounts"], "/dev/shm")
        assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": want}, where


def test_the_documented_run_lines_give_the_same_dev_shm():
    """Every `docker run` / `podman run` of a serving image in the deploy docs and the
    Dockerfiles says --shm-size, with the build's figure (a runtime's default is 64 MiB)."""
    from builder.shm import MIB

    want = f"{_shm_for_default_builds() // MIB}m"
    lines = [
        line
        for f in ("README.md", "Dockerfile", "Dockerfile.cpu")
        for line in _dockerfile(f).splitlines()
        if re.search(r"\b(docker|podman) run\b", line) and "captioner-server" in line
    ]
    assert len(lines) >= 3
    for line in lines:
        assert re.search(rf"--shm-size[= ]{want}\b", line), line


def test_every_serving_pod_drains_within_its_grace_period_unbuffered_on_a_read_only_root(rendered, monkeypatch):
    from launcher.cli import UNLOAD_GRACE_S

    for where, container, volumes in _pods(rendered):
        a = _launcher_args(container, monkeypatch)
        env = {e["name"]: e["value"] for e in container["env"]}
        assert env.get("PYTHONUNBUFFERED") == "1", where
        assert container["securityContext"]["readOnlyRootFilesystem"] is True, where
        assert "emptyDir" in _volume(volumes, container["volumeMounts"], "/tmp"), where
    for overlay in ("kserve", "kserve-canary"):
        isvc = _one(rendered[overlay], "InferenceService")
        a = _launcher_args(_one(rendered[overlay], "ServingRuntime")["spec"]["containers"][0], monkeypatch)
        # No preStop here: the drain, then tritonserver's unload grace, then the launcher's margin.
        assert isvc["spec"]["predictor"]["terminationGracePeriodSeconds"] > a.drain_timeout + UNLOAD_GRACE_S, overlay


def test_podman_runs_the_container_with_the_pods_constraints(rendered, monkeypatch):
    """deploy.containers (make serve-containers, tests/containers) holds a container to
    what the CPU pod allows."""
    from deploy import containers

    dep = _one(rendered["cpu"], "Deployment")
    spec, server = dep["spec"]["template"]["spec"], _server(dep)
    assert containers.POD_USER == f"{spec['securityContext']['runAsUser']}:{spec['securityContext']['runAsGroup']}"
    assert containers.POD_GRACE_S == spec["terminationGracePeriodSeconds"]
    assert server["resources"]["limits"]["memory"] == containers.POD_MEMORY.replace("g", "Gi")
    tmp = _volume(spec["volumes"], server["volumeMounts"], "/tmp")["emptyDir"]["sizeLimit"]
    assert tmp == containers.POD_TMP.replace("m", "Mi")
    assert containers.MODELS_DIR == _launcher_args(server, monkeypatch).repo
    assert containers.CONTAINER_PORTS == {p["name"]: p["containerPort"] for p in server["ports"]}
    args = containers.pod_run_args(PROJECT_ROOT, name="x", shm=123)
    for flag in (
        ["--user", containers.POD_USER],
        ["--read-only"],
        ["--cap-drop", "ALL"],
        ["--security-opt", "no-new-privileges"],
        ["--memory", containers.POD_MEMORY],
        ["--shm-size", "123"],
        ["--volume", f"{PROJECT_ROOT}:{containers.MODELS_DIR}:ro"],
    ):
        assert any(args[i : i + len(flag)] == flag for i in range(len(args))), flag


def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[re.sub(r"\[.*\]", "", name).lower()] = version
    return pins


def test_the_serving_images_pin_the_same_versions_as_the_project():
    serving, project = _pins(DEPLOY / "requirements-serving.txt"), _pins(PROJECT_ROOT / "requirements.txt")
    assert "torch" not in serving
    for name, version in serving.items():
        assert project.get(name) == version, (
            f"{name}: {version} in deploy/requirements-serving.txt, {project.get(name)} in requirements.txt"
        )


def test_queue_time_per_caption_request_is_what_the_rule_computes():
    """bench.queue_time (which measured the HPA target) reads the counters the way the
    adapter rule does. Counter values as a 2.51 server printed them for 128 requests."""
    from bench.queue_time import counters, helm_chart_us, per_request_us

    before = counters("")
    after = counters(
        'nv_inference_request_success{model="captioner",version="1"} 128\n'
        'nv_inference_request_success{model="preprocess",version="1"} 128\n'
        'nv_inference_request_success{model="decoder_step",version="1"} 0\n'
        'nv_inference_request_success{model="encoder",version="1"} 128\n'
        'nv_inference_request_success{model="caption_generator",version="1"} 128\n'
        'nv_inference_queue_duration_us{model="captioner",version="1"} 44\n'
        'nv_inference_queue_duration_us{model="preprocess",version="1"} 1225806\n'
        'nv_inference_queue_duration_us{model="decoder_step",version="1"} 0\n'
        'nv_inference_queue_duration_us{model="encoder",version="1"} 450307\n'
        'nv_inference_queue_duration_us{model="caption_generator",version="1"} 198586\n'
        'nv_inference_exec_count{model="encoder",version="1"} 18\n'
    )
    assert set(after) == {(c, m) for c in ("queue_duration_us", "request_success") for m in MODELS}
    assert per_request_us(before, after) == pytest.approx((1225806 + 450307 + 198586) / 129)
    # The chart's average over models is diluted by the queue-less ensemble and the idle step.
    assert helm_chart_us(before, after) < per_request_us(before, after) / 4
