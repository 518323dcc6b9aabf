"""The Helm chart (deploy/helm/lodestar), checked offline for the default values and every example: helm lint,
the rendered objects against the Kubernetes schemas and the vendored CRD schemas, the IaC scan, the
environment against the settings model, the secrets, the probes, the GPU pools and the values table.
Each values file is rendered once per session (tests/deploy/chart.py)."""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from chart import (
    CHART,
    CHECKOV_CONFIG,
    CUSTOM_KINDS,
    DEFAULT,
    KUBERNETES_VERSIONS,
    NAMESPACE,
    VALUES_FILES,
    containers,
    env_of,
    find,
    helm,
    parse,
    pod_spec,
    rendered,
    rendered_text,
    template,
    tool,
    validate_custom,
    values_args,
)
from settings_env import settings_env_names

from lodestar.health import LIVENESS_PATH, READINESS_PATH
from lodestar.settings import PROJECT_ROOT, Settings
from lodestar.snapshot_keys import PUBLISHED_KEYS

FULL = "rel-lodestar"
LODESTAR_IMAGE = "lodestar:0.1.0"
ALL_VALUES = pytest.mark.parametrize("values", list(VALUES_FILES))


def lodestar_containers(docs: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(workload, container) pairs that run the Lodestar image (the chart's own services and emulators)."""
    return [(doc, c) for doc, c in containers(docs) if c["image"].split("@")[0].split(":")[0].endswith("lodestar")]


# ---- the tools and the chart itself -----------------------------------------------------------------------


@ALL_VALUES
def test_helm_lint_strict(values: str) -> None:
    out = helm("lint", "--strict", str(CHART), *values_args(VALUES_FILES[values]))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "1 chart(s) linted, 0 chart(s) failed" in out.stdout


def test_the_pinned_helm_is_the_one_running() -> None:
    pinned = subprocess.run([str(PROJECT_ROOT / "scripts" / "chart_tools"), "versions"], capture_output=True,
                            text=True, check=True).stdout
    version = helm("version", "--short").stdout.strip()
    assert f"helm {version}" in pinned.splitlines()


def test_default_values_render_the_documented_objects() -> None:
    objects = sorted((d["kind"], d["metadata"]["name"]) for d in rendered(DEFAULT))
    assert objects == sorted([
        ("NetworkPolicy", f"{FULL}-clients"), ("NetworkPolicy", f"{FULL}-engines"),
        ("PodDisruptionBudget", f"{FULL}-dispatcher"), ("PodDisruptionBudget", f"{FULL}-gpu-h100"),
        ("ServiceAccount", FULL), ("Secret", FULL), ("ConfigMap", f"{FULL}-dashboard"),
        ("PersistentVolumeClaim", f"{FULL}-learner"), ("Service", f"{FULL}-dispatcher-metrics"),
        ("Service", f"{FULL}-gpu-h100"), ("Service", f"{FULL}-learner-metrics"),
        ("Deployment", f"{FULL}-dispatcher"), ("Deployment", f"{FULL}-learner"),
        ("StatefulSet", f"{FULL}-gpu-h100"), ("ScaledObject", f"{FULL}-dispatcher"), ("Job", f"{FULL}-topics"),
    ])
    for doc in rendered(DEFAULT):
        assert doc["metadata"]["namespace"] == NAMESPACE, doc["metadata"]["name"]


# ---- schemas ------------------------------------------------------------------------------------------------


@ALL_VALUES
def test_manifests_match_the_kubernetes_schemas(values: str) -> None:
    checked = 0
    for doc in rendered(values):
        if (doc["apiVersion"], doc["kind"]) in CUSTOM_KINDS:
            continue
        for version in KUBERNETES_VERSIONS:
            kubernetes_validate.validate(doc, version, strict=True)  # raises ValidationError with the reason
        checked += 1
    assert checked >= 10


def test_the_kubernetes_schema_check_rejects_a_typo() -> None:
    deployment = find(rendered(DEFAULT), "Deployment", f"{FULL}-dispatcher")
    deployment["spec"]["template"]["spec"]["containers"][0]["resource"] = {}  # `resources` misspelt
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[-1], strict=True)


@ALL_VALUES
def test_custom_resources_match_their_vendored_crd_schemas(values: str) -> None:
    for doc in rendered(values):
        if (doc["apiVersion"], doc["kind"]) in CUSTOM_KINDS:
            validate_custom(doc)


def test_the_crd_schema_check_rejects_unknown_and_mistyped_fields() -> None:
    scaled = find(rendered(DEFAULT), "ScaledObject", f"{FULL}-dispatcher")
    validate_custom(scaled)
    typo = json.loads(json.dumps(scaled))
    typo["spec"]["maxReplicas"] = typo["spec"].pop("maxReplicaCount")  # the HPA's name, not KEDA's
    with pytest.raises(jsonschema.ValidationError, match="maxReplicas"):
        validate_custom(typo)
    mistyped = json.loads(json.dumps(scaled))
    mistyped["spec"]["triggers"][0]["metadata"]["lagThreshold"] = 500  # trigger metadata values are strings
    with pytest.raises(jsonschema.ValidationError):
        validate_custom(mistyped)
    monitors = [d for d in rendered("staging-emulated") if d["kind"] == "ServiceMonitor"]
    assert monitors
    broken = json.loads(json.dumps(monitors[0]))
    broken["spec"]["endpoints"][0]["intervall"] = "15s"
    with pytest.raises(jsonschema.ValidationError, match="intervall"):
        validate_custom(broken)


def test_vendored_crds_carry_their_licence() -> None:
    for path in CUSTOM_KINDS.values():
        assert "Apache License" in (path.parent / "LICENSE").read_text()


# ---- the IaC scan -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkov_report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One checkov run over the rendered manifests of every values file."""
    folder = tmp_path_factory.mktemp("rendered")
    for name in VALUES_FILES:
        (folder / f"{name}.yaml").write_text(rendered_text(name))
    out = subprocess.run([tool("checkov"), "-d", str(folder), "--config-file", str(CHECKOV_CONFIG), "-o", "json"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode in (0, 1), out.stderr[-2000:]
    report = json.loads(out.stdout)
    return report[0] if isinstance(report, list) else report


def test_checkov_finds_nothing(checkov_report: dict[str, Any]) -> None:
    summary = checkov_report["summary"]
    failed = [(f["check_id"], f["resource"], Path(f["file_path"]).name)
              for f in checkov_report["results"]["failed_checks"]]
    assert failed == [], failed
    assert summary["parsing_errors"] == 0
    assert summary["passed"] > 500 and summary["resource_count"] >= 60


def test_every_skipped_check_is_explained_in_the_readme() -> None:
    skipped = set(yaml.safe_load(CHECKOV_CONFIG.read_text())["skip-check"])
    for name in VALUES_FILES:
        for doc in rendered(name):
            for key, value in doc["metadata"].get("annotations", {}).items():
                if key.startswith("checkov.io/skip"):
                    skipped.add(value.split("=", 1)[0])
    readme = (CHART / "README.md").read_text()
    section = readme.split("## Security exceptions", 1)[1].split("\n## ", 1)[0]
    explained = set(re.findall(r"^\| (CKV\w+) \|", section, re.MULTILINE))
    assert skipped == explained


# ---- environment and secrets --------------------------------------------------------------------------------


@ALL_VALUES
def test_every_lodestar_variable_the_chart_sets_is_a_setting(values: str) -> None:
    known = settings_env_names()
    names = {name for _, c in containers(rendered(values)) for name in env_of(c)}
    lodestar = {n for n in names if n.startswith("LODESTAR_")}
    assert lodestar, "no LODESTAR_* variable rendered"
    assert lodestar <= known, f"not settings: {sorted(lodestar - known)}"


def test_a_setting_renamed_in_values_env_is_caught() -> None:
    out = template(None, "env.LODESTAR_KAFKA__BOOTSTRAP_SERVER=typo:9092")
    names = {n for _, c in containers(parse(out.stdout)) for n in env_of(c)}
    assert "LODESTAR_KAFKA__BOOTSTRAP_SERVER" in names - settings_env_names()


@ALL_VALUES
def test_the_hmac_key_reaches_only_the_learner_and_dispatchers_from_a_secret(values: str) -> None:
    docs = rendered(values)
    readers = set()
    for doc, c in containers(docs):
        entry = env_of(c).get("LODESTAR_SNAPSHOT_SIGNING__KEY")
        if entry is not None:
            assert "value" not in entry, "the HMAC key must never be a plain value"
            assert entry["valueFrom"]["secretKeyRef"]["key"] == "hmac-key"
            readers.add(doc["metadata"]["name"])
    assert readers == {f"{FULL}-dispatcher", f"{FULL}-learner"}


def test_no_secret_has_a_usable_default() -> None:
    def hmac_key(text: str) -> str:
        secret = find(parse(text), "Secret", FULL)
        return base64.b64decode(secret["data"]["hmac-key"]).decode()

    first, second = hmac_key(rendered_text(DEFAULT)), hmac_key(template(None).stdout)
    assert first != second  # generated per install, not a default
    assert len(first) == 64 and first.encode() not in PUBLISHED_KEYS
    given = template(None, "secrets.hmacKey=from-my-vault", "redis.auth.enabled=true").stdout
    assert hmac_key(given) == "from-my-vault"
    redis_password = base64.b64decode(find(parse(given), "Secret", FULL)["data"]["redis-password"]).decode()
    assert len(redis_password) == 48


def test_an_existing_secret_is_referenced_not_created() -> None:
    docs = rendered("existing-secret-otlp")
    assert not [d for d in docs if d["kind"] == "Secret"]
    for doc, c in containers(docs):
        env = env_of(c)
        for name in ("LODESTAR_SNAPSHOT_SIGNING__KEY", "REDIS_PASSWORD"):
            if name in env:
                ref = env[name]["valueFrom"]["secretKeyRef"]
                assert ref["name"] == "lodestar-keys", (doc["metadata"]["name"], name)
        if "LODESTAR_REDIS__URL" in env:
            assert env["LODESTAR_REDIS__URL"]["value"] == "redis://:$(REDIS_PASSWORD)@redis.platform:6379/0"
            names = list(env)
            assert names.index("REDIS_PASSWORD") < names.index("LODESTAR_REDIS__URL")  # defined before it is used


# ---- workloads ----------------------------------------------------------------------------------------------


@ALL_VALUES
def test_lodestar_containers_run_lodestar_commands_with_real_probes(values: str) -> None:
    import typer.main

    from app.cli import app

    commands = set(typer.main.get_command(app).commands)  # type: ignore[attr-defined]
    for doc, c in lodestar_containers(rendered(values)):
        assert c["args"][0] in commands, f"{doc['metadata']['name']}/{c['name']} runs {c['args'][0]}"
        if c["args"][0] in ("dispatcher", "worker", "learner"):
            assert c["readinessProbe"]["httpGet"]["path"] == READINESS_PATH
            assert c["livenessProbe"]["httpGet"]["path"] == LIVENESS_PATH
            port = env_of(c)[f"LODESTAR_{c['args'][0].upper()}__METRICS_PORT"]["value"]
            assert [p["containerPort"] for p in c["ports"] if p["name"] == "metrics"] == [int(port)]


@ALL_VALUES
def test_security_defaults(values: str) -> None:
    for doc, c in containers(rendered(values)):
        where = f"{doc['metadata']['name']}/{c['name']}"
        pod = pod_spec(doc)
        assert pod is not None and pod["securityContext"]["runAsNonRoot"] is True, where
        assert pod["automountServiceAccountToken"] is False, where
        security = c["securityContext"]
        assert security["allowPrivilegeEscalation"] is False and security["capabilities"]["drop"] == ["ALL"], where
        skipped = "CKV_K8S_22" in " ".join(doc["metadata"].get("annotations", {}).values())
        assert security["readOnlyRootFilesystem"] is not skipped, where
        assert c["resources"]["requests"] and c["resources"]["limits"], where


def test_dispatchers_scale_on_their_lag_up_to_the_partitions() -> None:
    docs = rendered(DEFAULT)
    scaled = find(docs, "ScaledObject", f"{FULL}-dispatcher")
    assert "replicas" not in find(docs, "Deployment", f"{FULL}-dispatcher")["spec"]  # KEDA owns it
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "kafka"
    assert trigger["metadata"]["consumerGroup"] == Settings().dispatcher.consumer_group
    assert trigger["metadata"]["topic"] == "lodestar.requests"
    assert trigger["metadata"]["allowIdleConsumers"] == "false"
    assert scaled["spec"]["maxReplicaCount"] <= int(env_value(docs, "dispatcher", "LODESTAR_KAFKA__REQUEST_PARTITIONS"))
    too_many = template(None, "dispatcher.autoscaling.maxReplicas=13")
    assert too_many.returncode != 0 and "exceeds kafka.requestPartitions" in too_many.stderr
    fixed = parse(template(None, "dispatcher.autoscaling.enabled=false", "dispatcher.replicas=3").stdout)
    assert find(fixed, "Deployment", f"{FULL}-dispatcher")["spec"]["replicas"] == 3
    assert not [d for d in fixed if d["kind"] == "ScaledObject"]


def env_value(docs: list[dict[str, Any]], container: str, name: str) -> str:
    values = {env_of(c)[name]["value"] for _, c in containers(docs) if c["name"] == container}
    assert len(values) == 1, (container, name, values)
    return values.pop()


def test_gpu_pools_one_statefulset_per_type_worker_id_from_the_pod_name() -> None:
    docs = rendered("two-gpu-pools")
    for pool, gpu, product, concurrency in (("h100", "H100", "NVIDIA-H100-80GB-HBM3", "256"),
                                            ("l40s", "L40S", "NVIDIA-L40S", "128")):
        sts = find(docs, "StatefulSet", f"{FULL}-gpu-{pool}")
        pod = sts["spec"]["template"]["spec"]
        engine, worker = pod["containers"]
        assert engine["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert pod["nodeSelector"] == {"nvidia.com/gpu.product": product}
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
        assert engine["env"][-1]["valueFrom"]["secretKeyRef"] == {"name": "hf-token", "key": "HF_TOKEN"}
        assert [v["metadata"]["name"] for v in sts["spec"]["volumeClaimTemplates"]] == ["hf-cache"]
        env = env_of(worker)
        assert worker["args"] == ["worker", "--id", "$(POD_NAME)"]
        assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
        assert env["LODESTAR_WORKER__WORKER_ID"]["value"] == "$(POD_NAME)"
        assert env["LODESTAR_WORKER__GPU_TYPE"]["value"] == gpu
        assert env["LODESTAR_WORKER__MAX_CONCURRENCY"]["value"] == concurrency
        assert env["LODESTAR_WORKER__SGLANG_URL"]["value"] == "http://127.0.0.1:30000"
        assert "LODESTAR_SNAPSHOT_SIGNING__KEY" not in env
    l40s_engine = find(docs, "StatefulSet", f"{FULL}-gpu-l40s")["spec"]["template"]["spec"]["containers"][0]
    assert l40s_engine["args"][-2:] == ["--mem-fraction-static", "0.85"]


def test_emulated_pools_need_no_gpu() -> None:
    docs = rendered("staging-emulated")
    pools = [d for d in docs if d["kind"] == "StatefulSet" and "-gpu-" in d["metadata"]["name"]]
    assert {p["metadata"]["labels"]["lodestar.io/gpu-type"] for p in pools} == {"H100", "A30"}
    for sts in pools:
        pod = sts["spec"]["template"]["spec"]
        engine = pod["containers"][0]
        gpu = sts["metadata"]["labels"]["lodestar.io/gpu-type"]
        assert engine["image"] == LODESTAR_IMAGE
        assert engine["args"][:3] == ["emulator", "--gpu", gpu]
        assert "nvidia.com/gpu" not in json.dumps(pod)
        assert "volumeClaimTemplates" not in sts["spec"]


def test_in_release_kafka_and_redis_admit_only_lodestar_pods() -> None:
    docs = rendered("staging-emulated")
    assert env_value(docs, "dispatcher", "LODESTAR_KAFKA__BOOTSTRAP_SERVERS") == f"{FULL}-kafka.{NAMESPACE}.svc:9092"
    assert env_value(docs, "dispatcher", "LODESTAR_KAFKA__REPLICATION_FACTOR") == "1"
    for component, port in (("kafka", 9092), ("redis", 6379)):
        policy = find(docs, "NetworkPolicy", f"{FULL}-{component}")
        assert policy["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == component
        (rule,) = policy["spec"]["ingress"]
        assert rule["ports"] == [{"port": port, "protocol": "TCP"}]
        assert rule["from"][0] == {"podSelector": {"matchLabels": {"lodestar.io/client": "rel"}}}
    labelled = {d["metadata"]["name"] for d in docs if pod_spec(d) is not None
                and d["spec"]["template"]["metadata"]["labels"].get("lodestar.io/client") == "rel"}
    assert labelled == {f"{FULL}-dispatcher", f"{FULL}-learner", f"{FULL}-topics", f"{FULL}-gpu-h100",
                        f"{FULL}-gpu-a30"}


def test_topics_job_is_a_hook_with_the_configured_partitions() -> None:
    docs = rendered(DEFAULT)
    job = find(docs, "Job", f"{FULL}-topics")
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "post-install,post-upgrade"
    assert env_value(docs, "topics", "LODESTAR_KAFKA__REQUEST_PARTITIONS") == "12"
    assert env_value(docs, "topics", "LODESTAR_KAFKA__REPLICATION_FACTOR") == "3"
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["args"] == ["topics", "create"]


def test_the_dashboard_configmap_is_the_compose_dashboard() -> None:
    cm = find(rendered(DEFAULT), "ConfigMap", f"{FULL}-dashboard")
    source = PROJECT_ROOT / "configs" / "grafana" / "dashboards" / "lodestar.json"
    assert json.loads(cm["data"]["lodestar.json"]) == json.loads(source.read_text())


def test_values_table_in_the_readme_is_current() -> None:
    out = subprocess.run([sys.executable, str(PROJECT_ROOT / "scripts" / "gen_chart_readme.py"), "--check"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_every_value_is_documented() -> None:
    sys.path.insert(0, str(PROJECT_ROOT / "scripts"))
    from gen_chart_readme import VALUES, documented_keys

    text = VALUES.read_text()
    documented = {k.path for k in documented_keys(text.splitlines())}

    def undocumented(node: Any, path: tuple[str, ...]) -> list[str]:
        if path in documented:
            return []
        if isinstance(node, dict) and node:
            return [miss for key, value in node.items() for miss in undocumented(value, (*path, key))]
        return [".".join(path)]

    assert undocumented(yaml.safe_load(text), ()) == []
