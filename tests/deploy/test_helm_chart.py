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
        for name in ("LODESTAR_SNAPSHOT_SIGNING__KEY", "LODESTAR_REDIS__PASSWORD"):
            if name in env:
                ref = env[name]["valueFrom"]["secretKeyRef"]
                assert ref["name"] == "lodestar-keys", (doc["metadata"]["name"], name)
        if "LODESTAR_REDIS__URL" in env:
            assert env["LODESTAR_REDIS__URL"]["value"] == "redis://redis.platform:6379/0"  # no password in the URL
            assert "LODESTAR_REDIS__PASSWORD" in env


# ---- workloads ----------------------------------------------------------------------------------------------


@ALL_VALUES
def test_lodestar_containers_run_lodestar_commands_with_real_probes(values: str) -> None:
    import typer.main

    from app.cli import app

    commands = set(typer.main.get_command(app).commands)  # type: ignore[attr-defined]
    for doc, c in lodestar_containers(rendered(values)):
        assert c["args"][0] in commands, f"{doc['metadata']['name']}/{c['name']} runs {c['args'][0]}"
        if c["args"][0] in ("dispatcher", "worker", "learner", "gateway"):
            assert c["readinessProbe"]["httpGet"]["path"] == READINESS_PATH
            assert c["livenessProbe"]["httpGet"]["path"] == LIVENESS_PATH
            setting, name = ("PORT", "http") if c["args"][0] == "gateway" else ("METRICS_PORT", "metrics")
            port = env_of(c)[f"LODESTAR_{c['args'][0].upper()}__{setting}"]["value"]
            assert [p["containerPort"] for p in c["ports"] if p["name"] == name] == [int(port)]
            assert c["readinessProbe"]["httpGet"]["port"] == name


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


def test_the_gateway_serves_its_port_with_keys_from_a_secret_or_says_it_has_none() -> None:
    docs = rendered("two-gpu-pools")
    deployment = find(docs, "Deployment", f"{FULL}-gateway")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    env = env_of(container)
    assert container["args"] == ["gateway"]
    assert env["LODESTAR_GATEWAY__GATEWAY_ID"]["value"] == "$(POD_NAME)"  # each pod its own reply topic
    assert env["LODESTAR_GATEWAY__API_KEY_HASHES"]["valueFrom"]["secretKeyRef"] == {"name": "gateway-keys",
                                                                                    "key": "digests"}
    assert env["LODESTAR_GATEWAY__ALLOW_ANONYMOUS"]["value"] == "false"
    service = find(docs, "Service", f"{FULL}-gateway")
    assert service["spec"]["ports"] == [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}]
    policy = find(docs, "NetworkPolicy", f"{FULL}-gateway")
    assert policy["spec"]["ingress"] == [{"ports": [{"port": 8000, "protocol": "TCP"}]}]
    assert policy["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "gateway"
    assert find(docs, "PodDisruptionBudget", f"{FULL}-gateway")["spec"]["maxUnavailable"] == 1
    monitor = find(docs, "ServiceMonitor", f"{FULL}-gateway")
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["http"]
    staging = env_of(find(rendered("staging-emulated"), "Deployment", f"{FULL}-gateway")["spec"]["template"]["spec"]
                     ["containers"][0])
    assert staging["LODESTAR_GATEWAY__ALLOW_ANONYMOUS"]["value"] == "true"  # said out loud in the example
    assert not [d for d in rendered(DEFAULT) if "gateway" in d["metadata"]["name"]]  # off unless enabled
    refused = template(None, "gateway.enabled=true")
    assert refused.returncode != 0 and "gateway.enabled needs API keys" in refused.stderr
    digest = "a" * 64
    given = env_of(find(parse(template(None, "gateway.enabled=true", f"gateway.apiKeyHashes={{{digest}}}").stdout),
                        "Deployment", f"{FULL}-gateway")["spec"]["template"]["spec"]["containers"][0])
    assert json.loads(given["LODESTAR_GATEWAY__API_KEY_HASHES"]["value"]) == [digest]


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
                        f"{FULL}-gpu-a30", f"{FULL}-gateway"}


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


# ---- external Kafka over SASL_SSL, Redis over TLS with ACL users ----------------------------------------------


SECURE = "external-secure"


def settings_of(container: dict[str, Any]) -> Settings:
    """The settings a container's environment gives (each value from a Secret replaced by a stand-in of 32
    bytes, `$(POD_NAME)` by a pod name), validated as the service would at start."""
    env = {}
    for name, entry in env_of(container).items():
        if name.startswith("LODESTAR_"):
            value = entry.get("value", "s" * 32)
            if name.endswith("__ACCEPTED_KEYS"):  # JSON from a Secret: stand-ins of their shape
                value = "{}"
            elif name.endswith("__API_KEY_HASHES"):
                value = json.dumps(["a" * 64])
            env[name] = value.replace("$(POD_NAME)", "pod-0")
    import os
    from unittest import mock

    with mock.patch.dict(os.environ, env, clear=True):
        return Settings()


def mounted_file(doc: dict[str, Any], container: dict[str, Any], path: Path) -> tuple[str, str]:
    """(Secret name, key) a file in a container comes from: a volumeMount of the container, a secret volume of
    its pod, an item of that volume; fails if the file is not there."""
    pod = pod_spec(doc)
    assert pod is not None
    for mount in container.get("volumeMounts", []):
        if path.parent == Path(mount["mountPath"]):
            (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
            (item,) = [i for i in volume["secret"]["items"] if i["path"] == path.name]
            return volume["secret"]["secretName"], item["key"]
    raise AssertionError(f"{path} is not mounted in {doc['metadata']['name']}/{container['name']}")


def test_external_secure_every_service_logs_in_as_its_own_principal_over_tls() -> None:
    docs = rendered(SECURE)
    users = {}
    for doc, c in lodestar_containers(docs):
        s = settings_of(c)
        where = f"{doc['metadata']['name']}/{c['name']}"
        assert s.kafka.security_protocol == "SASL_SSL" and s.kafka.uses_sasl and s.kafka.uses_tls, where
        assert s.redis.uses_tls and s.redis.username, where
        for file, secret in ((s.kafka.ssl_cafile, "kafka-ca"), (s.redis.ssl_cafile, "redis-ca")):
            assert file is not None, where
            assert mounted_file(doc, c, file) == (secret, "ca.crt"), where
        env = env_of(c)
        for name in ("LODESTAR_KAFKA__SASL_PASSWORD", "LODESTAR_REDIS__PASSWORD"):
            assert "value" not in env[name] and env[name]["valueFrom"]["secretKeyRef"]["name"] == "lodestar-credentials"
        users[c["args"][0]] = (s.kafka.sasl_username, s.redis.username,
                               env["LODESTAR_KAFKA__SASL_PASSWORD"]["valueFrom"]["secretKeyRef"]["key"])
    assert users == {
        "dispatcher": ("lodestar-dispatcher", "lodestar-dispatcher", "kafka-password-dispatcher"),
        "learner": ("lodestar-learner", "lodestar-learner", "kafka-password-learner"),
        "worker": ("lodestar-worker", "lodestar-worker", "kafka-password-worker"),
        "gateway": ("lodestar-gateway", "lodestar-gateway", "kafka-password-gateway"),
        "topics": ("lodestar-admin", "lodestar-admin", "kafka-password"),
    }
    assert {settings_of(c).snapshot_signing.key_id for _, c in lodestar_containers(docs)} == {"2026-12"}


def test_external_secure_lag_scaler_logs_in_as_the_dispatchers() -> None:
    docs = rendered(SECURE)
    (trigger,) = find(docs, "ScaledObject", f"{FULL}-dispatcher")["spec"]["triggers"]
    assert trigger["metadata"]["tls"] == "enable" and trigger["metadata"]["sasl"] == "scram_sha512"
    auth = find(docs, "TriggerAuthentication", trigger["authenticationRef"]["name"])
    (dispatcher,) = [c for _, c in containers(docs) if c["name"] == "dispatcher"]
    env = env_of(dispatcher)
    by_parameter = {e["parameter"]: e for e in auth["spec"]["env"]}
    assert {p: (e["name"], e["containerName"]) for p, e in by_parameter.items()} == {
        "username": ("LODESTAR_KAFKA__SASL_USERNAME", "dispatcher"),
        "password": ("LODESTAR_KAFKA__SASL_PASSWORD", "dispatcher")}
    assert all(e["name"] in env for e in by_parameter.values())
    assert auth["spec"]["secretTargetRef"] == [{"parameter": "ca", "name": "kafka-ca", "key": "ca.crt"}]
    plain = rendered(DEFAULT)
    (plain_trigger,) = find(plain, "ScaledObject", f"{FULL}-dispatcher")["spec"]["triggers"]
    assert "authenticationRef" not in plain_trigger and "sasl" not in plain_trigger["metadata"]
    assert not [d for d in plain if d["kind"] == "TriggerAuthentication"]


def test_sasl_needs_a_user_and_a_password_never_a_generated_one() -> None:
    no_user = template(None, "kafka.security.protocol=SASL_SSL", "secrets.kafkaPassword=p")
    assert no_user.returncode != 0 and "kafka.security.saslUsername is required" in no_user.stderr
    no_password = template(None, "kafka.security.protocol=SASL_SSL", "kafka.security.saslUsername=u")
    assert no_password.returncode != 0 and "secrets.kafkaPassword" in no_password.stderr
    given = parse(template(None, "kafka.security.protocol=SASL_PLAINTEXT", "kafka.security.saslUsername=u",
                           "secrets.kafkaPassword=from-my-vault", "kafka.security.saslMechanism=PLAIN").stdout)
    secret = find(given, "Secret", FULL)
    assert base64.b64decode(secret["data"]["kafka-password"]).decode() == "from-my-vault"
    (trigger,) = find(given, "ScaledObject", f"{FULL}-dispatcher")["spec"]["triggers"]
    assert trigger["metadata"]["sasl"] == "plaintext" and "tls" not in trigger["metadata"]
