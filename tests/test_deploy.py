"""The shipping artefacts: Dockerfile, kustomize overlays, alerts, autoscaling, dashboard.

Everything here runs without a cluster: manifests are rendered with `kubectl kustomize`,
validated against the Kubernetes schemas (kubernetes-validate) and scanned (checkov); the
metric names the dashboard, the alerts and the adapter rule use are checked against the metric
contract and against the /metrics of a real app instance (create_app over the CPU engine
loading the tiny synthetic checkpoint, configured by GPTQ_* environment variables).
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.conftest import BRANCHES
from tests.deploy_tools import (
    CHECKOV,
    CONTRACT_METRICS,
    CRD_SCHEMAS,
    DEPLOY,
    HADOLINT,
    OVERLAYS,
    REPO,
    TARGET_LABELS,
    Manifest,
    MetricSpec,
    MetricType,
    find_one,
    label_values,
    labels_match,
    promql_problems,
    render,
    run_tool,
    specs_from_exposition,
)

CONTRACT = {spec.name: spec for spec in CONTRACT_METRICS}
# Kubernetes versions the manifests must be valid for: the oldest we document and the newest.
K8S_VERSIONS = ("1.30.0", kubernetes_validate.utils.latest_version())
# Checkov findings accepted on purpose; each carries its reason in a checkov.io/skipN annotation.
ACCEPTED_FINDINGS = {"CKV_K8S_11", "CKV_K8S_43"}


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[Manifest]]:
    return {overlay: render(DEPLOY / "overlays" / overlay) for overlay in OVERLAYS}


def _pod_spec(manifests: list[Manifest]) -> dict[str, Any]:
    return find_one(manifests, "Deployment")["spec"]["template"]["spec"]


def _server(manifests: list[Manifest]) -> dict[str, Any]:
    containers = _pod_spec(manifests)["containers"]
    assert len(containers) == 1
    return containers[0]


def _config(manifests: list[Manifest]) -> dict[str, str]:
    """The server's environment from the ConfigMap its envFrom names."""
    (source,) = _server(manifests)["envFrom"]
    name = source["configMapRef"]["name"]
    (config_map,) = [m for m in manifests if m["kind"] == "ConfigMap" and m["metadata"]["name"] == name]
    return config_map["data"]


# --- Dockerfile ----------------------------------------------------------------------------------

def _dockerfile_stages() -> list[list[str]]:
    """Instructions per stage, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", (REPO / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines()]
    stages: list[list[str]] = [[]]
    for line in lines:
        if not line or line.startswith("#"):
            continue
        if line.startswith("FROM "):
            stages.append([])
        stages[-1].append(line)
    return stages


def test_dockerfile_passes_hadolint() -> None:
    proc = run_tool(HADOLINT, "--no-color", "Dockerfile")
    assert proc.returncode == 0 and not proc.stdout.strip(), proc.stdout + proc.stderr


def test_dockerfile_compiles_exllamav2_ahead_of_time_and_runs_unprivileged() -> None:
    preamble, builder, runtime = _dockerfile_stages()
    assert re.match(r"FROM nvidia/cuda:\S*-devel-\S* AS builder", builder[0]), builder[0]
    assert re.match(r"FROM nvidia/cuda:\S* AS runtime", runtime[0]) and "devel" not in runtime[0]
    arch_arg = next(line for line in builder if line.startswith("ARG TORCH_CUDA_ARCH_LIST="))
    assert arch_arg.split("=", 1)[1].strip('"').split() == ["8.0", "8.6", "8.9", "9.0"]
    builder_text = "\n".join(builder)
    # The extension is compiled in the builder and installed as the prebuilt module...
    assert "import exllamav2.ext" in builder_text and "platlib" in builder_text
    assert "assert not ext.build_jit" in builder_text
    # ...and the runtime proves it loads without a compiler.
    check = next(line for line in runtime if 'import torch, exllamav2_ext' in line)
    assert check.startswith("RUN python -c") and 'python -c "import zmq, msgspec"' in check
    assert "COPY --from=builder /opt/venv /opt/venv" in runtime
    # Triton builds its launcher with the host C compiler against Python.h at run time.
    apt = next(line for line in runtime if "apt-get install" in line).split()
    assert {"gcc", "libc6-dev", "python3-dev"} <= set(apt)

    user = next(line for line in runtime if line.startswith("USER ")).split()[1]
    assert int(user.split(":")[0]) >= 10000
    assert "EXPOSE 8000" in runtime
    healthcheck = next(line for line in runtime if line.startswith("HEALTHCHECK "))
    assert "/health" in healthcheck
    env = " ".join(line for line in runtime if line.startswith("ENV "))
    for cache in ("HF_HOME=/cache/", "TRITON_CACHE_DIR=/cache/", "PYTHONDONTWRITEBYTECODE=1"):
        assert cache in env
    entrypoint = json.loads(next(line for line in runtime if line.startswith("ENTRYPOINT "))[11:])
    command = json.loads(next(line for line in runtime if line.startswith("CMD "))[4:])
    assert entrypoint[-1:] + command == ["gptq-serve", "serve"]


def test_dockerignore_lets_in_exactly_what_the_image_copies() -> None:
    patterns = [line for line in (REPO / ".dockerignore").read_text().splitlines()
                if line and not line.startswith("#")]
    assert patterns[0] == "*", "the build context is an allow-list"
    allowed = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    copied = {src for line in _dockerfile_stages()[1] if line.startswith("COPY ")
              and "--from" not in line for src in line.split()[1:-1]}
    assert copied == allowed
    assert all((REPO / path).exists() for path in copied)


# --- Kubernetes manifests ------------------------------------------------------------------------

def _validate(manifest: Manifest, version: str) -> None:
    if manifest["kind"] in CRD_SCHEMAS:
        jsonschema.validate(manifest, CRD_SCHEMAS[manifest["kind"]])
    else:
        kubernetes_validate.validate(manifest, version, strict=True)


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_rendered_manifests_validate(rendered: dict[str, list[Manifest]], version: str) -> None:
    for overlay, manifests in rendered.items():
        for manifest in manifests:
            try:
                _validate(manifest, version)
            except Exception as err:  # every validator's error, reported with the object
                pytest.fail(f"{overlay}: {manifest['kind']}/{manifest['metadata']['name']} "
                            f"is invalid for Kubernetes {version}: {err}")
    for manifest in render(DEPLOY / "grafana"):
        _validate(manifest, version)


def test_checkov_finds_nothing_unjustified(rendered: dict[str, list[Manifest]],
                                           tmp_path: Path) -> None:
    for overlay, manifests in rendered.items():
        (tmp_path / f"{overlay}.yaml").write_text(yaml.safe_dump_all(manifests))
    shutil.copy(REPO / "Dockerfile", tmp_path / "Dockerfile")
    proc = run_tool(CHECKOV, "--directory", str(tmp_path), "--framework", "kubernetes",
                    "dockerfile", "--skip-download", "--output", "json")
    reports = json.loads(proc.stdout)
    reports = reports if isinstance(reports, list) else [reports]
    assert {r["check_type"] for r in reports} == {"kubernetes", "dockerfile"}, proc.stderr
    for report in reports:
        failed = [(c["check_id"], c["resource"]) for c in report["results"]["failed_checks"]]
        assert not failed, f"checkov {report['check_type']} findings: {failed}"
        assert report["summary"]["parsing_errors"] == 0
        skipped = {c["check_id"] for c in report["results"]["skipped_checks"]}
        assert skipped <= ACCEPTED_FINDINGS
    for manifests in rendered.values():
        annotations = find_one(manifests, "Deployment")["metadata"]["annotations"]
        reasons = dict(v.split("=", 1) for k, v in annotations.items() if k.startswith("checkov.io/skip"))
        assert set(reasons) == ACCEPTED_FINDINGS
        assert all(len(reason.split()) >= 8 for reason in reasons.values()), reasons


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_deployment_is_restricted_and_probed(rendered: dict[str, list[Manifest]],
                                             overlay: str) -> None:
    manifests = rendered[overlay]
    pod, server = _pod_spec(manifests), _server(manifests)
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] >= 10000
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    security = server["securityContext"]
    assert security["allowPrivilegeEscalation"] is False
    assert security["readOnlyRootFilesystem"] is True
    assert security["capabilities"]["drop"] == ["ALL"]
    assert security.get("privileged", False) is False
    assert server["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert not server["image"].startswith("gptq-serve:") and not server["image"].endswith(":latest")

    (port,) = server["ports"]
    assert (port["name"], port["containerPort"]) == ("http", 8000)
    startup, ready, live = (server[p] for p in ("startupProbe", "readinessProbe", "livenessProbe"))
    assert startup["httpGet"] == {"path": "/ready", "port": "http"}
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 20 * 60, \
        "the startup probe must cover a model download and load"
    assert ready["httpGet"] == {"path": "/ready", "port": "http"}
    assert live["httpGet"] == {"path": "/health", "port": "http"}

    config = _config(manifests)
    pre_stop = server["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    drain = int(pre_stop[1]) + int(config["GPTQ_SHUTDOWN_TIMEOUT"])
    assert pod["terminationGracePeriodSeconds"] >= drain + 10, \
        "the kubelet would kill streams the server is still finishing"

    mounts = {m["mountPath"]: m for m in server["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]
    for variable in ("HF_HOME", "GPTQ_DOWNLOAD_DIR", "TRITON_CACHE_DIR"):
        mount = next(m for path, m in mounts.items() if config[variable].startswith(path + "/"))
        assert not mount.get("readOnly", False)
        claim = volumes[mount["name"]]["persistentVolumeClaim"]["claimName"]
        assert any(m["kind"] == "PersistentVolumeClaim" and m["metadata"]["name"] == claim
                   for m in manifests)
    key_dir = str(Path(config["GPTQ_API_KEY_FILE"]).parent)
    key_volume = volumes[mounts[key_dir]["name"]]["secret"]
    assert key_volume["secretName"] == "gptq-serve-api-keys"
    assert not key_volume.get("optional", False), "the server must not start without API keys"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_objects_select_each_other(rendered: dict[str, list[Manifest]], overlay: str) -> None:
    manifests = rendered[overlay]
    deployment = find_one(manifests, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert labels_match(deployment["spec"]["selector"]["matchLabels"], pod_labels)
    service = find_one(manifests, "Service")
    assert labels_match(service["spec"]["selector"], pod_labels)
    (service_port,) = service["spec"]["ports"]
    assert service_port["targetPort"] == _server(manifests)["ports"][0]["name"]
    assert labels_match(find_one(manifests, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"], pod_labels)
    policy = find_one(manifests, "NetworkPolicy")["spec"]
    assert labels_match(policy["podSelector"]["matchLabels"], pod_labels)
    assert {p["port"] for rule in policy["ingress"] for p in rule["ports"]} == {"http"}
    monitor = find_one(manifests, "ServiceMonitor")
    assert labels_match(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == [service_port["name"]]
    assert [e["path"] for e in monitor["spec"]["endpoints"]] == ["/metrics"]
    account = find_one(manifests, "ServiceAccount")
    assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == account["metadata"]["name"]
    namespaces = {m["metadata"].get("namespace") for m in manifests if m["kind"] != "Namespace"}
    assert namespaces == {find_one(manifests, "Namespace")["metadata"]["name"]}


def test_production_autoscales_on_the_queue(rendered: dict[str, list[Manifest]]) -> None:
    single, production = rendered["single-gpu"], rendered["production"]
    assert find_one(single, "Deployment")["spec"]["replicas"] == 1
    assert not [m for m in single if m["kind"] == "HorizontalPodAutoscaler"]
    deployment = find_one(production, "Deployment")
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"
    hpa = find_one(production, "HorizontalPodAutoscaler")["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                     "name": deployment["metadata"]["name"]}
    assert 2 <= hpa["minReplicas"] < hpa["maxReplicas"]
    (metric,) = hpa["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["target"]["type"] == "AverageValue"
    metric_name = metric["pods"]["metric"]["name"]
    assert CONTRACT[metric_name].type is MetricType.GAUGE
    up, down = hpa["behavior"]["scaleUp"], hpa["behavior"]["scaleDown"]
    assert up["stabilizationWindowSeconds"] <= 60 < 300 <= down["stabilizationWindowSeconds"]
    assert max(p["value"] for p in down["policies"] if p["type"] == "Pods") == 1
    pdb = find_one(production, "PodDisruptionBudget")["spec"]
    assert hpa["minReplicas"] - pdb["maxUnavailable"] >= 1

    adapter = yaml.safe_load((DEPLOY / "prometheus-adapter" / "values.yaml").read_text())
    (rule,) = [r for r in adapter["rules"]["custom"] if r["name"]["as"] == metric_name]
    assert re.fullmatch(rule["name"]["matches"], metric_name)
    assert promql_problems(rule["seriesQuery"], CONTRACT) == []
    assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"},
                                              "pod": {"resource": "pod"}}
    for placeholder in ("<<.Series>>", "<<.LabelMatchers>>", "<<.GroupBy>>"):
        assert placeholder in rule["metricsQuery"]


# --- PromQL in the dashboard, the alerts and the adapter rule --------------------------------------

def _dashboard() -> dict[str, Any]:
    return json.loads((DEPLOY / "grafana" / "gptq-serve.json").read_text())


def _label_values_queries() -> list[tuple[str, str]]:
    """(selector, label) of each `label_values(selector, label)` template variable."""
    queries = []
    for variable in _dashboard()["templating"]["list"]:
        if variable["type"] == "query":
            match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", variable["query"]["query"])
            assert match, variable["query"]
            queries.append((match.group(1), match.group(2)))
    return queries


def _all_promql(rendered: dict[str, list[Manifest]]) -> dict[str, list[str]]:
    rule = find_one(rendered["production"], "PrometheusRule")
    adapter = yaml.safe_load((DEPLOY / "prometheus-adapter" / "values.yaml").read_text())
    return {
        "dashboard": [t["expr"] for p in _dashboard()["panels"] for t in p.get("targets", [])]
        + [selector for selector, _ in _label_values_queries()],
        "alerts": [r["expr"] for g in rule["spec"]["groups"] for r in g["rules"]],
        "adapter": [r["seriesQuery"] for r in adapter["rules"]["custom"]],
    }


def test_queries_use_only_contract_metrics(rendered: dict[str, list[Manifest]]) -> None:
    problems = [f"{where}: {problem}" for where, exprs in _all_promql(rendered).items()
                for expr in exprs for problem in promql_problems(expr, CONTRACT)]
    assert not problems, "\n".join(problems)
    for selector, label in _label_values_queries():
        metric = selector.split("{")[0]
        assert label in TARGET_LABELS | CONTRACT[metric].labels


def test_dashboard_covers_the_service() -> None:
    dashboard = _dashboard()
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24 and panel["datasource"]["uid"] == "${datasource}"
        assert len({t["refId"] for t in panel["targets"]}) == len(panel["targets"])
    text = json.dumps(dashboard)
    for needed in ("gptq_generation_tokens_total", "gptq_time_to_first_token_seconds_bucket",
                   "gptq_inter_token_latency_seconds_bucket", "gptq_num_requests_waiting",
                   "gptq_num_requests_running", "gptq_kv_cache_usage_ratio",
                   "gptq_num_preemptions_total", "gptq_http_requests_total",
                   "gptq_requests_rejected_total", "gptq_kv_cache_blocks_cached",
                   "gptq_prefix_cache_queries_total", "gptq_prefix_cache_hits_total"):
        assert needed in text, f"the dashboard shows nothing of {needed}"


def test_alerts_cover_queue_cache_errors_and_stalls(rendered: dict[str, list[Manifest]]) -> None:
    rules = [r for g in find_one(rendered["production"], "PrometheusRule")["spec"]["groups"]
             for r in g["rules"]]
    def alerting_on(*fragments: str) -> list[str]:
        return [r["alert"] for r in rules if all(f in r["expr"] for f in fragments)]
    assert alerting_on("gptq_num_requests_waiting", "> 8")
    assert alerting_on("gptq_kv_cache_usage_ratio")
    assert alerting_on("gptq_http_requests_total", 'status=~"5.."')
    assert alerting_on("gptq_generation_tokens_total", "gptq_num_requests_waiting", "== 0")


def test_deployment_doc_covers_every_branch() -> None:
    doc = (REPO / "docs" / "deployment.md").read_text()
    for branch in BRANCHES:
        assert f"`{branch}`" in doc, f"docs/deployment.md does not cover {branch}"
    assert "fp16" in doc and "nvidia.com/gpu" in doc


def test_the_deployment_docs_queries_use_exported_metrics() -> None:
    """The PromQL the guide shows (e.g. its KEDA trigger on vLLM's queue metric) names only
    what the server exports."""
    doc = (REPO / "docs" / "deployment.md").read_text()
    queries = re.findall(r"^\s+query: (.+)$", doc, re.MULTILINE)
    assert queries
    problems = [p for query in queries for p in promql_problems(query, CONTRACT)]
    assert not problems, problems


@pytest.mark.parametrize(("expr", "problem"), [
    ("sum(rate(gptq_generation_token_total[5m]))", "not exported"),
    ('sum(gptq_num_requests_waiting{queue="x"})', "has no label"),
    ("sum by (finish_reason) (gptq_num_requests_waiting)", "grouping by"),
    ("sum(rate(gptq_prompt_tokens_total[5m])", "unclosed"),
    ("histogramquantile(0.9, gptq_request_queue_time_seconds_bucket)", "unknown PromQL function"),
    ("gptq_time_to_first_token_seconds", "not exported"),
])
def test_promql_reader_catches_mistakes(expr: str, problem: str) -> None:
    problems = promql_problems(expr, CONTRACT)
    assert len(problems) == 1 and problem in problems[0], problems


# --- the live server ---------------------------------------------------------------------------
# A real app (app.main.create_app) loading the tiny synthetic checkpoint on the CPU engine,
# configured through GPTQ_* environment variables as the pods configure it.

API_KEY = "deploy-test-key"


def _server_env(key_file: Path, checkpoint: Path) -> dict[str, str]:
    return {"GPTQ_API_KEY_FILE": str(key_file), "GPTQ_METRICS_REQUIRE_AUTH": "false",
            "GPTQ_MODEL": str(checkpoint), "GPTQ_REVISION": "", "GPTQ_OFFLINE": "true",
            "GPTQ_DEVICE": "cpu", "GPTQ_DTYPE": "float32", "GPTQ_NUM_KV_BLOCKS": "128",
            "GPTQ_MAX_NUM_SEQS": "8", "GPTQ_MAX_NUM_BATCHED_TOKENS": "128",
            "GPTQ_MAX_MODEL_LEN": "512", "GPTQ_SERVED_MODEL_NAME": "tiny"}


@pytest.fixture(scope="module")
def exposition(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    """/metrics of a live app after one completion, so labelled metrics have samples."""
    from fastapi.testclient import TestClient

    from app.main import create_app
    from app.settings import Settings

    key_file = tmp_path_factory.mktemp("keys") / "api-keys"
    key_file.write_text(f"{API_KEY}\n")
    auth = {"Authorization": f"Bearer {API_KEY}"}
    with pytest.MonkeyPatch.context() as env:
        for name, value in _server_env(key_file, tiny_checkpoint).items():
            env.setenv(name, value)
        settings = Settings()
    with TestClient(create_app(settings)) as client:
        # The model loads after the port opens: /ready is 503 until it is warmed up.
        deadline = time.monotonic() + 60
        while (ready := client.get("/ready")).status_code != 200:
            assert time.monotonic() < deadline, ready.text
            time.sleep(0.1)
        assert client.get("/health").status_code == 200, "probes send no API key"
        response = client.post("/v1/completions", headers=auth,
                               json={"model": "tiny", "prompt": "Hello", "max_tokens": 4})
        assert response.status_code == 200, response.text
        scrape = client.get("/metrics")
        assert scrape.status_code == 200, "Prometheus scrapes /metrics without a key"
        return scrape.text


def test_server_exports_the_contract_metrics(exposition: str) -> None:
    live = specs_from_exposition(exposition)
    for spec in CONTRACT_METRICS:
        assert spec.name in live, f"/metrics does not export {spec.name}"
        assert live[spec.name].type is spec.type, spec.name
        assert live[spec.name].labels <= spec.labels, spec.name
    # The alerts and dashboard filter on these label values.
    routes = label_values(exposition, "gptq_http_requests_total", "route")
    assert "/v1/completions" in routes, routes
    statuses = label_values(exposition, "gptq_http_requests_total", "status")
    assert statuses and all(re.fullmatch(r"[1-5]\d\d", s) for s in statuses), statuses


def test_queries_use_only_what_the_server_exports(exposition: str,
                                                   rendered: dict[str, list[Manifest]]) -> None:
    live = specs_from_exposition(exposition)
    # A labelled family with no samples yet (e.g. no rejection happened) shows no labels; take
    # its label names from the contract, its existence and type from the live server.
    known = {name: MetricSpec(name, spec.type, spec.labels or CONTRACT.get(name, spec).labels)
             for name, spec in live.items()}
    problems = [f"{where}: {problem}" for where, exprs in _all_promql(rendered).items()
                for expr in exprs for problem in promql_problems(expr, known)]
    assert not problems, "\n".join(problems)


def test_configmaps_hold_only_server_settings(rendered: dict[str, list[Manifest]],
                                             tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from app.settings import Settings

    key_file = tmp_path / "api-keys"
    key_file.write_text(f"{API_KEY}\n")
    for overlay, manifests in rendered.items():
        config = _config(manifests)
        for key, value in config.items():
            if key.startswith("GPTQ_"):
                assert key[5:].lower() in Settings.model_fields, f"{overlay}: {key} is no setting"
                monkeypatch.setenv(key, value)
        # The pod's key file is a mounted Secret; here a local one stands in for it.
        monkeypatch.setenv("GPTQ_API_KEY_FILE", str(key_file))
        settings = Settings()
        assert settings.api_keys == [API_KEY]
        assert settings.shutdown_timeout == float(config["GPTQ_SHUTDOWN_TIMEOUT"])
        assert settings.revision == config["GPTQ_REVISION"]
