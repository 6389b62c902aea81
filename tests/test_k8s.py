"""deploy/k8s: the kustomize base and every overlay render, and what they render is valid and consistent.

No cluster here: `kubectl kustomize` renders each (kubectl is required, the test fails without it), every object
is validated against the Kubernetes API schemas of K8S_VERSION with kubernetes-validate in strict mode (unknown
fields fail), the KEDA ScaledObject (a CRD, unknown to those schemas) against tests/schemas/, every DLSR_
variable a container gets (ConfigMap, Secret, env) is a real setting with a valid value, and the probes, ports,
Services, volumes and the autoscaler agree with the settings they run under.
"""

from __future__ import annotations

import base64
import copy
import functools
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests._settings_env import check_settings_env, unknown_settings

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
K8S_VERSION = "1.30"  # oldest Kubernetes minor still commonly run; kubernetes-validate bundles its schemas
OVERLAYS = {
    "default": K8S,  # `kubectl apply -k deploy/k8s`: the base
    "base": K8S / "base",
    "gpu": K8S / "overlays" / "gpu",
    "dev": K8S / "overlays" / "dev",
}
KEDA_SCHEMA = json.loads((ROOT / "tests" / "schemas" / "keda-scaledobject.schema.json").read_text())
DLSR_COMPONENTS = {"monitor", "trainer", "notify"}
IMAGE = "dlsr-monitor"


def _kubectl() -> str:
    path = shutil.which("kubectl")
    if path is None:
        pytest.fail("kubectl is not installed: these tests render deploy/k8s with `kubectl kustomize`", pytrace=False)
    return path


def _kustomize(directory: Path) -> list[dict]:
    proc = subprocess.run(
        [_kubectl(), "kustomize", str(directory)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, f"kubectl kustomize {directory} failed:\n{proc.stderr}"
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


@functools.cache
def _rendered(overlay: str) -> tuple[dict, ...]:
    return tuple(_kustomize(OVERLAYS[overlay]))


def render(overlay: str) -> list[dict]:
    return copy.deepcopy(list(_rendered(overlay)))


def _one(objects: list[dict], kind: str, name: str) -> dict:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} rendered"
    return found[0]


def _by_name(objects: list[dict], kind: str, name: str) -> dict:
    """A generated ConfigMap/Secret by its name before kustomize's hash suffix."""
    found = [
        o for o in objects
        if o["kind"] == kind and re.fullmatch(rf"{re.escape(name)}(-[a-z0-9]{{10}})?", o["metadata"]["name"])
    ]
    assert len(found) == 1, f"{kind} {name}: {len(found)} rendered"
    return found[0]


def _dlsr_deployments(objects: list[dict]) -> list[dict]:
    return [
        o for o in objects
        if o["kind"] == "Deployment"
        and o["spec"]["template"]["metadata"]["labels"].get("app.kubernetes.io/component") in DLSR_COMPONENTS
    ]


def _component(deployment: dict) -> str:
    return deployment["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"]


def _secret_values(secret: dict) -> dict[str, str]:
    values = {k: base64.b64decode(v).decode() for k, v in secret.get("data", {}).items()}
    return {**values, **secret.get("stringData", {})}  # the API server lets stringData win


def _container_env(objects: list[dict], container: dict) -> dict[str, str]:
    """What the container's process sees: envFrom (ConfigMaps, Secrets) first, then env (which wins)."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(_one(objects, "ConfigMap", source["configMapRef"]["name"])["data"])
        if "secretRef" in source:
            env.update(_secret_values(_one(objects, "Secret", source["secretRef"]["name"])))
    for item in container.get("env", []):
        assert "value" in item, f"{item['name']}: only literal values are checked here"
        env[item["name"]] = item["value"]
    return env


def _matches(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


@pytest.fixture(autouse=True)
def _clean_dir(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # no dlsr.toml or .env of the checkout reaches Settings


# ---- rendering and schemas -----------------------------------------------------------------------------------


def test_kubectl_with_kustomize_is_installed():
    proc = subprocess.run([_kubectl(), "version", "--client"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "Kustomize Version" in proc.stdout, proc.stdout + proc.stderr


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_renders(overlay):
    objects = render(overlay)
    kinds = {(o["kind"], o["metadata"]["name"]) for o in objects}
    for name in ("dlsr-monitor", "dlsr-trainer", "dlsr-notify"):
        assert ("Deployment", name) in kinds
    assert all(o["metadata"].get("namespace") == "dlsr" for o in objects if o["kind"] != "Namespace")


def test_default_is_the_base():
    assert render("default") == render("base")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_is_valid_kubernetes(overlay):
    checked = 0
    for obj in render(overlay):
        if obj["apiVersion"].startswith("keda.sh/"):
            continue  # a CRD: kubernetes-validate has no schema for it; see test_scaled_object_* below
        where = f"{overlay}: {obj['kind']}/{obj['metadata']['name']}"
        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{where}: {'.'.join(map(str, exc.path))}: {exc.message}", pytrace=False)
        checked += 1
    assert checked >= 10


def test_kubernetes_validation_is_not_a_rubber_stamp():
    deployment = _one(render("base"), "Deployment", "dlsr-monitor")
    bad = copy.deepcopy(deployment)
    bad["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGett"] = {"path": "/healthz"}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)
    bad = copy.deepcopy(deployment)
    bad["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)


def _scaled_objects(objects: list[dict]) -> list[dict]:
    return [o for o in objects if o["kind"] == "ScaledObject"]


def _validate_scaled_object(obj: dict) -> None:
    jsonschema.Draft202012Validator.check_schema(KEDA_SCHEMA)
    jsonschema.Draft202012Validator(KEDA_SCHEMA).validate(obj)
    behavior = obj["spec"].get("advanced", {}).get("horizontalPodAutoscalerConfig", {}).get("behavior")
    if behavior is not None:  # KEDA passes it to the HorizontalPodAutoscaler it creates: check it as one
        hpa = {
            "apiVersion": "autoscaling/v2",
            "kind": "HorizontalPodAutoscaler",
            "metadata": {"name": obj["metadata"]["name"]},
            "spec": {
                "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "x"},
                "maxReplicas": obj["spec"].get("maxReplicaCount", 100),
                "behavior": behavior,
            },
        }
        kubernetes_validate.validate(hpa, K8S_VERSION, strict=True)


@pytest.mark.parametrize("overlay", ["base", "gpu"])
def test_scaled_object_has_only_documented_keda_fields(overlay):
    objects = render(overlay)
    scaled = _scaled_objects(objects)
    assert len(scaled) == 1
    _validate_scaled_object(scaled[0])


def test_keda_schema_is_not_a_rubber_stamp():
    good = _scaled_objects(render("base"))[0]
    _validate_scaled_object(good)
    for mutate in (
        lambda o: o["spec"].update(maxReplicas=12),  # the HPA's name, not KEDA's
        lambda o: o["spec"]["triggers"][0]["metadata"].update(lagThreshold=1000),  # must be a string
        lambda o: o["spec"]["triggers"][0]["metadata"].update(consumergroup="dlsr-monitor"),
        lambda o: o["spec"]["triggers"][0]["metadata"].pop("bootstrapServers"),
        lambda o: o["spec"]["scaleTargetRef"].pop("name"),
    ):
        bad = copy.deepcopy(good)
        mutate(bad)
        with pytest.raises(jsonschema.ValidationError):
            _validate_scaled_object(bad)
    bad = copy.deepcopy(good)
    bad["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]["policies"][0]["type"] = 7
    with pytest.raises(kubernetes_validate.ValidationError):
        _validate_scaled_object(bad)


@pytest.mark.parametrize("overlay", ["base", "gpu"])
def test_scaled_object_scales_the_monitor_on_its_own_group_topic_and_brokers(overlay):
    objects = render(overlay)
    scaled = _scaled_objects(objects)[0]
    spec = scaled["spec"]
    target = spec["scaleTargetRef"]
    assert target.get("kind", "Deployment") == "Deployment" and target.get("apiVersion", "apps/v1") == "apps/v1"
    monitor = _one(objects, "Deployment", target["name"])
    assert _component(monitor) == "monitor"
    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "kafka"
    container = monitor["spec"]["template"]["spec"]["containers"][0]
    settings = check_settings_env(_container_env(objects, container), f"{overlay}: monitor")
    meta = trigger["metadata"]
    assert meta["consumerGroup"] == settings.kafka.group_id == "dlsr-monitor"
    assert meta["topic"] == settings.kafka.input_topic == "images"
    assert meta["bootstrapServers"] == settings.kafka.bootstrap_servers, "KEDA must read the monitors' brokers"
    assert int(meta["lagThreshold"]) > 0
    # KEDA's operator runs in its own namespace: short service names would resolve there.
    for server in meta["bootstrapServers"].split(","):
        assert "." in server.partition(":")[0], f"{server}: use a fully qualified name"


def test_dev_overlay_drops_keda_and_brings_kafka_and_redis():
    objects = render("dev")
    assert not _scaled_objects(objects)
    monitor = _one(objects, "Deployment", "dlsr-monitor")
    container = monitor["spec"]["template"]["spec"]["containers"][0]
    settings = check_settings_env(_container_env(objects, container), "dev: monitor")
    kafka_host, _, kafka_port = settings.kafka.bootstrap_servers.partition(":")
    kafka = _one(objects, "StatefulSet", "kafka")
    kafka_env = {e["name"]: e["value"] for e in kafka["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert kafka_env["KAFKA_ADVERTISED_LISTENERS"] == f"PLAINTEXT://{settings.kafka.bootstrap_servers}"
    assert kafka["spec"]["template"]["spec"]["enableServiceLinks"] is False  # no KAFKA_PORT=tcp://... property
    assert kafka_host.split(".")[:2] == ["kafka", "dlsr"]
    assert int(kafka_port) in [p["port"] for p in _one(objects, "Service", "kafka")["spec"]["ports"]]
    redis = _one(objects, "Deployment", "redis")
    redis_container = redis["spec"]["template"]["spec"]["containers"][0]
    args = redis_container["args"]
    assert args[args.index("--appendonly") + 1] == "yes", "Redis holds the registry: it must persist"
    assert any(v["mountPath"] == "/data" for v in redis_container["volumeMounts"])
    password_ref = redis_container["env"][0]["valueFrom"]["secretKeyRef"]
    secret = _by_name(objects, "Secret", "dlsr-secrets")
    assert password_ref == {"name": secret["metadata"]["name"], "key": "DLSR_REDIS__PASSWORD"}
    assert redis_container["env"][0]["name"] in args[args.index("--requirepass") + 1]
    assert settings.redis.url.startswith("redis://redis.dlsr.svc:6379")


# ---- settings ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_dlsr_variable_is_a_valid_setting(overlay):
    objects = render(overlay)
    seen = set()
    for obj in objects:
        if obj["kind"] in ("ConfigMap", "Secret"):
            data = _secret_values(obj) if obj["kind"] == "Secret" else obj["data"]
            problems = unknown_settings(data)
            assert not problems, f"{overlay}: {obj['kind']}/{obj['metadata']['name']}: {problems}"
            seen |= {k for k in data if k.startswith("DLSR_")}
    for deployment in _dlsr_deployments(objects):
        for container in deployment["spec"]["template"]["spec"]["containers"]:
            env = _container_env(objects, container)
            check_settings_env(env, f"{overlay}: {deployment['metadata']['name']}/{container['name']}")
            seen |= {k for k in env if k.startswith("DLSR_")}
    assert {"DLSR_REDIS__PASSWORD", "DLSR_KAFKA__SASL_PASSWORD", "DLSR_METRICS__PORT"} <= seen


def test_settings_check_is_not_a_rubber_stamp():
    with pytest.raises(AssertionError, match="DLSR_MODEL__ALHPA"):
        check_settings_env({"DLSR_MODEL__ALHPA": "0.1"}, "x")
    with pytest.raises(AssertionError, match="alpha"):
        check_settings_env({"DLSR_MODEL__ALPHA": "2"}, "x")


def test_secret_holds_the_passwords_and_only_placeholders():
    objects = render("base")
    values = _secret_values(_by_name(objects, "Secret", "dlsr-secrets"))
    assert {"DLSR_REDIS__PASSWORD", "DLSR_KAFKA__SASL_PASSWORD"} <= set(values)
    for key, value in values.items():
        assert "CHANGE-ME" in value, f"{key}: the example Secret must hold placeholders only"
    config = _by_name(objects, "ConfigMap", "dlsr-config")["data"]
    assert not {k for k in config if "PASSWORD" in k or "WEBHOOK" in k}, "secrets belong in the Secret"


# ---- pods: probes, ports, images, volumes ----------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_point_at_healthz_and_readyz_on_the_named_metrics_port(overlay):
    objects = render(overlay)
    deployments = _dlsr_deployments(objects)
    assert {_component(d) for d in deployments} == DLSR_COMPONENTS
    for deployment in deployments:
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        where = f"{overlay}: {deployment['metadata']['name']}"
        settings = check_settings_env(_container_env(objects, container), where)
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports.get("metrics") == settings.metrics.port, f"{where}: port 'metrics' != DLSR_METRICS__PORT"
        for probe, path in (("startupProbe", "/healthz"), ("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
            get = container[probe]["httpGet"]
            assert (get["path"], get["port"]) == (path, "metrics"), f"{where}: {probe}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_metrics_services_select_the_pods_and_carry_prometheus_annotations(overlay):
    objects = render(overlay)
    services = [o for o in objects if o["kind"] == "Service" and o["metadata"].get("annotations")]
    for deployment in _dlsr_deployments(objects):
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        port = next(p["containerPort"] for p in container["ports"] if p["name"] == "metrics")
        mine = [s for s in services if _matches(s["spec"]["selector"], labels)]
        assert len(mine) == 1, f"{deployment['metadata']['name']}: {len(mine)} metrics Services"
        svc = mine[0]
        notes = svc["metadata"]["annotations"]
        assert notes["prometheus.io/scrape"] == "true"
        assert notes["prometheus.io/path"] == "/metrics"
        assert int(notes["prometheus.io/port"]) == port
        (svc_port,) = svc["spec"]["ports"]
        assert svc_port["targetPort"] == "metrics" and svc_port["port"] == port
        # Not-ready pods (no model yet, Redis down) are the ones whose metrics matter.
        assert svc["spec"]["publishNotReadyAddresses"] is True
        assert _matches(deployment["spec"]["selector"]["matchLabels"], labels)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_run_the_image_set_by_kustomize_as_the_image_user(overlay):
    kustomization = yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())
    assert any(i["name"] == IMAGE for i in kustomization["images"]), "set the image with kustomize `images:`"
    for deployment in _dlsr_deployments(render(overlay)):
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsUser"] == 10001 and pod["securityContext"]["runAsNonRoot"] is True
        assert pod["enableServiceLinks"] is False and pod["automountServiceAccountToken"] is False
        for container in pod["containers"]:
            assert container["image"] == "dlsr-monitor:latest"
            assert container["command"][0] == "dlsr"
            assert container["securityContext"]["allowPrivilegeEscalation"] is False


def test_kustomize_images_retags_every_dlsr_container(tmp_path):
    overlay = tmp_path / "mine"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [os.path.relpath(K8S / "base", overlay)],  # kustomize refuses absolute paths
                "images": [{"name": IMAGE, "newName": "registry.example.com/dlsr", "newTag": "0.1.0"}],
            }
        )
    )
    images = {
        c["image"]
        for d in _dlsr_deployments(_kustomize(overlay))
        for c in d["spec"]["template"]["spec"]["containers"]
    }
    assert images == {"registry.example.com/dlsr:0.1.0"}


def _mounts(container: dict) -> dict[str, dict]:
    return {m["mountPath"]: m for m in container.get("volumeMounts", [])}


def _claim(pod: dict, volume_name: str) -> dict:
    volume = next(v for v in pod["volumes"] if v["name"] == volume_name)
    return volume["persistentVolumeClaim"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_artifact_store_is_shared_read_only_by_monitors_and_written_by_the_trainer(overlay):
    objects = render(overlay)
    claims = {}
    for deployment in _dlsr_deployments(objects):
        component = _component(deployment)
        if component == "notify":
            continue
        pod = deployment["spec"]["template"]["spec"]
        container = pod["containers"][0]
        settings = check_settings_env(_container_env(objects, container), f"{overlay}: {component}")
        mounts = _mounts(container)
        store = str(settings.model.artifact_store)
        assert store in mounts, f"{component}: nothing mounted at DLSR_MODEL__ARTIFACT_STORE {store}"
        claims[component] = _claim(pod, mounts[store]["name"])["claimName"]
        if component == "monitor":
            assert mounts[store].get("readOnly") is True
            assert _claim(pod, mounts[store]["name"]).get("readOnly") is True
        else:  # the trainer publishes, and keeps its features and vetted images on volumes too
            assert not mounts[store].get("readOnly")
            for path in (settings.model.feature_cache, settings.trainer.workdir):
                assert any(Path(path).is_relative_to(m) for m in mounts if m != store), f"{path} is not on a volume"
    assert claims["monitor"] == claims["trainer"]
    pvc = _one(objects, "PersistentVolumeClaim", claims["monitor"])
    expected = ["ReadWriteOnce"] if overlay == "dev" else ["ReadWriteMany"]  # dev: one node
    assert pvc["spec"]["accessModes"] == expected


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_trainer_is_one_replica_recreated_and_monitors_roll_without_a_gap(overlay):
    objects = render(overlay)
    trainer = _one(objects, "Deployment", "dlsr-trainer")
    assert trainer["spec"]["replicas"] == 1 and trainer["spec"]["strategy"] == {"type": "Recreate"}
    monitor = _one(objects, "Deployment", "dlsr-monitor")
    assert monitor["spec"]["replicas"] >= 1
    assert monitor["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    for deployment in _dlsr_deployments(objects):
        resources = deployment["spec"]["template"]["spec"]["containers"][0]["resources"]
        assert resources["requests"]["cpu"] and resources["requests"]["memory"] and resources["limits"]["memory"]


def test_gpu_overlay_gives_monitor_and_trainer_a_gpu_and_cuda():
    objects = render("gpu")
    for name in ("dlsr-monitor", "dlsr-trainer"):
        pod = _one(objects, "Deployment", name)["spec"]["template"]["spec"]
        container = pod["containers"][0]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
        settings = check_settings_env(_container_env(objects, container), f"gpu: {name}")
        assert settings.model.device == "cuda"
        assert pod["nodeSelector"] and pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    notify = _one(objects, "Deployment", "dlsr-notify")["spec"]["template"]["spec"]
    assert "nvidia.com/gpu" not in notify["containers"][0]["resources"].get("limits", {})
    base_monitor = _one(render("base"), "Deployment", "dlsr-monitor")["spec"]["template"]["spec"]
    assert "nvidia.com/gpu" not in base_monitor["containers"][0]["resources"]["limits"]


def test_the_readme_production_overlay_renders_and_replaces_every_placeholder(tmp_path):
    readme = (ROOT / "README.md").read_text()
    marker = "`deploy/k8s/overlays/prod/kustomization.yaml`:"
    assert marker in readme
    block = re.search(r"```yaml\n(.*?)```", readme[readme.index(marker):], re.S).group(1)
    shutil.copytree(ROOT / "deploy" / "k8s", tmp_path / "k8s")
    prod = tmp_path / "k8s" / "overlays" / "prod"
    prod.mkdir()
    (prod / "kustomization.yaml").write_text(block)
    (prod / "secrets.env").write_text(
        'DLSR_REDIS__PASSWORD=s3cret\nDLSR_NOTIFY__WEBHOOKS=["https://hooks.slack.com/services/T/B/X"]\n'
    )
    objects = _kustomize(prod)
    for obj in objects:
        if not obj["apiVersion"].startswith("keda.sh/"):
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    (scaled,) = _scaled_objects(objects)
    _validate_scaled_object(scaled)
    for deployment in _dlsr_deployments(objects):
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        assert container["image"] == "registry.example.com/dlsr-monitor:0.1.0"
        env = _container_env(objects, container)
        settings = check_settings_env(env, f"prod: {deployment['metadata']['name']}")
        assert not [k for k, v in env.items() if "CHANGE-ME" in v], "a placeholder survived the overlay"
        assert settings.redis.password.get_secret_value() == "s3cret"
        assert settings.notify.webhooks == ["https://hooks.slack.com/services/T/B/X"]
        if _component(deployment) == "monitor":
            assert scaled["spec"]["triggers"][0]["metadata"]["bootstrapServers"] == settings.kafka.bootstrap_servers
