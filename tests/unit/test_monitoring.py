"""deploy/monitoring: the rules pass promtool's own unit tests (deploy/monitoring/tests),
every alert has a summary, a runbook section and a test that sees it fire, the objective is
stated once, the Kubernetes PrometheusRule is the same rules, and the Prometheus
configuration `make monitor` writes scrapes the ports the launcher serves. promtool comes
with Debian's `prometheus` package (`make monitor-setup`); without it those checks skip."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
import yaml

from launcher.cli import REPLICA_PORT_STEP, parse_args
from launcher.metrics import PROBE_BUCKETS
from launcher.tritonserver import PROJECT_ROOT
from monitor import config

RUNBOOK = PROJECT_ROOT / "docs" / "runbook.md"


def _promtool() -> str:
    tool = shutil.which("promtool")
    if tool is None:
        pytest.skip(
            "promtool is not on PATH: the alert rules were NOT unit-tested "
            "(make monitor-setup installs Debian's prometheus package, which has it)"
        )
    return tool


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=120, cwd=PROJECT_ROOT)


def test_promtool_unit_tests_of_the_rules_pass():
    tests = sorted(config.RULE_TESTS.glob("*.yml"))
    assert tests, "no promtool tests in deploy/monitoring/tests"
    out = _run(_promtool(), "test", "rules", *map(str, tests))
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("SUCCESS") == len(tests)


def test_promtool_accepts_the_rules_file():
    out = _run(_promtool(), "check", "rules", str(config.RULES))
    assert out.returncode == 0, out.stdout + out.stderr


def _anchors(markdown: str) -> set[str]:
    """GitHub's anchors for the markdown's headings."""
    out = set()
    for heading in re.findall(r"^#+\s+(.+?)\s*$", markdown, re.M):
        out.add(re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-"))
    return out


def test_every_alert_has_a_summary_a_severity_and_its_own_runbook_section():
    anchors = _anchors(RUNBOOK.read_text())
    seen = set()
    for rule in config.alerts(config.load_rules()):
        name = rule["alert"]
        annotations = rule.get("annotations", {})
        assert annotations.get("summary"), f"{name}: no summary"
        assert rule["labels"]["severity"] in ("page", "ticket"), name
        path, _, anchor = annotations["runbook_url"].partition("#")
        assert path == "docs/runbook.md" and anchor in anchors, f"{name}: {annotations['runbook_url']} is no section of {RUNBOOK}"
        seen.add(anchor)
    # one section per alert, the two burn-rate windows of one objective sharing theirs
    assert len(seen) == len({r["alert"].replace("Fast", "").replace("Slow", "") for r in config.alerts(config.load_rules())})


def test_every_alert_is_seen_firing_by_a_promtool_test():
    firing = set()
    for path in config.RULE_TESTS.glob("*.yml"):
        for group in yaml.safe_load(path.read_text())["tests"]:
            for case in group.get("alert_rule_test", []):
                if case.get("exp_alerts"):
                    firing.add(case["alertname"])
    assert {r["alert"] for r in config.alerts(config.load_rules())} <= firing


def _recorded(name: str) -> str:
    rules = [r for g in config.load_rules()["groups"] for r in g["rules"] if r.get("record") == name]
    return " ".join(r["expr"] for r in rules)


def test_the_objective_is_stated_once_and_the_rules_use_it():
    objective = float(re.fullmatch(r"vector\((.+)\)", _recorded("captioner:slo_latency_objective_seconds"))[1])
    target = float(re.fullmatch(r"vector\((.+)\)", _recorded("captioner:slo_latency_target_ratio"))[1])
    assert objective in PROBE_BUCKETS  # the histogram can tell answers within it from the rest
    for window in ("5m", "30m", "1h", "6h"):
        expr = _recorded(f"captioner:slo_latency_errors:ratio_rate{window}")
        assert f'captioner_probe_duration_seconds_bucket{{le="{objective}"}}[{window}]' in expr, window
    budget = round(1 - target, 6)
    burns = {r["alert"]: r["expr"] for r in config.alerts(config.load_rules()) if r["alert"].startswith("CaptionerLatencyBudget")}
    assert set(burns) == {"CaptionerLatencyBudgetBurnFast", "CaptionerLatencyBudgetBurnSlow"}
    for expr in burns.values():
        factors = re.findall(r"\(([\d.]+) \* ([\d.]+)\)", expr)
        assert len(factors) == 2 and all(float(b) == budget for _, b in factors), expr


def test_the_kubernetes_prometheus_rule_is_generated_from_the_rules_file():
    assert config.K8S_RULE.read_text() == config.k8s_rule_text(config.load_rules()), (
        "deploy/k8s/base/prometheusrule.yaml is stale: run make monitor-generate"
    )
    kustomization = yaml.safe_load((config.K8S_RULE.parent / "kustomization.yaml").read_text())
    assert config.K8S_RULE.name in kustomization["resources"]


@pytest.mark.parametrize("overlay", ["cpu", "gpu"])
def test_each_overlay_carries_rules_promtool_accepts(overlay, tmp_path):
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not on PATH: the overlays were NOT rendered")
    promtool = _promtool()
    out = _run(kubectl, "kustomize", str(PROJECT_ROOT / "deploy" / "k8s" / "overlays" / overlay))
    assert out.returncode == 0, out.stderr
    (rule,) = [d for d in yaml.safe_load_all(out.stdout) if d and d["kind"] == "PrometheusRule"]
    assert rule["spec"]["groups"] == config.load_rules()["groups"]
    (tmp_path / "rules.yml").write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    check = _run(promtool, "check", "rules", str(tmp_path / "rules.yml"))
    assert check.returncode == 0, check.stdout + check.stderr


def test_prometheus_scrapes_every_replica_and_the_supervisor_where_the_launcher_serves(monkeypatch):
    for var in ("CAPTIONER_METRICS_PORT", "CAPTIONER_SUPERVISOR_METRICS_PORT"):
        monkeypatch.delenv(var, raising=False)
    a = parse_args(["--replicas", "3"])
    cfg = config.prometheus_config(replicas=a.replicas, metrics_port=a.metrics_port)
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    triton = jobs[config.TRITON_JOB]["static_configs"]
    assert [(c["targets"], c["labels"]["replica"]) for c in triton] == [
        ([f"127.0.0.1:{a.metrics_port + REPLICA_PORT_STEP * k}"], str(k)) for k in range(3)
    ]
    assert jobs[config.SUPERVISOR_JOB]["static_configs"] == [{"targets": [f"127.0.0.1:{a.supervisor_metrics_port}"]}]
    # the alert on unreachable targets covers both jobs
    up = next(r for r in config.alerts(config.load_rules()) if r["alert"] == "CaptionerTargetDown")["expr"]
    selector = re.search(r'job=~"([^"]+)"', up)[1]
    assert all(re.fullmatch(selector, job) for job in jobs)
    assert "captioner.rules.yml" in cfg["rule_files"][0]
    with pytest.raises(ValueError, match="duration"):
        config.prometheus_config(scrape_interval="15 seconds")
    assert config.SUPERVISOR_JOB not in str(config.prometheus_config(supervisor_port=0))


def test_promtool_accepts_the_generated_configuration(tmp_path):
    promtool = _promtool()
    cfg = config.prometheus_config(replicas=2)
    (tmp_path / "prometheus.yml").write_text(config.dump(cfg))
    out = _run(promtool, "check", "config", str(tmp_path / "prometheus.yml"))
    assert out.returncode == 0, out.stdout + out.stderr
    amtool = shutil.which("amtool")
    if amtool:
        (tmp_path / "alertmanager.yml").write_text(config.dump(config.alertmanager_config()))
        out = _run(amtool, "check-config", str(tmp_path / "alertmanager.yml"))
        assert out.returncode == 0, out.stdout + out.stderr


def test_a_test_config_shortens_every_for_and_refuses_nonsense():
    rules = config.with_for(config.load_rules(), "1s")
    assert {r["for"] for r in config.alerts(rules)} == {"1s"}
    assert any(r.get("for") != "1s" for r in config.alerts(config.load_rules()))  # the source is untouched
    with pytest.raises(ValueError):
        config.with_for(config.load_rules(), "soon")


def _dashboard() -> dict:
    import json

    return json.loads(config.DASHBOARD.read_text())


def test_the_dashboard_json_is_generated_by_monitor_dashboard():
    from monitor import dashboard

    assert config.DASHBOARD.read_text() == dashboard.to_json(), "deploy/monitoring/dashboard.json is stale: make monitor-generate"


def test_the_dashboard_shows_what_on_call_needs():
    from monitor.dashboard import queries

    exprs = " ".join(e for _, e in queries(_dashboard()))
    for needed in (
        "captioner:requests_arrived:rate1m",  # traffic
        "captioner:requests_succeeded:rate1m",  # goodput ...
        "captioner:requests_unserved:rate1m",  # ... vs refusals
        "captioner:model_refused:rate1m",
        "captioner_probe_duration_seconds_bucket",  # latency quantiles ...
        "captioner:slo_latency_objective_seconds",  # ... against the objective
        "captioner:model_queue_seconds_per_request:rate1m",
        "captioner:model_compute_seconds_per_request:rate1m",
        "captioner:model_batch_size:rate1m",
        "captioner_supervisor_repairs_total",
        "captioner_supervisor_restarts_total",
        "captioner_model_info",
        "version",
    ):
        assert needed in exprs, needed
    recorded = {r["record"] for g in config.load_rules()["groups"] for r in g["rules"] if "record" in r}
    used = set(re.findall(r"captioner:[a-z_:0-9]+", exprs))
    assert used <= recorded, f"the dashboard reads recording rules that do not exist: {used - recorded}"


def test_every_dashboard_query_is_valid_promql(tmp_path):
    """promtool parses each query as a recording rule (Grafana's $__rate_interval as 1m)."""
    from monitor.dashboard import queries

    promtool = _promtool()
    rules = [
        {"record": f"dashboard:query_{i}", "expr": expr.replace("$__rate_interval", "1m")}
        for i, (_, expr) in enumerate(queries(_dashboard()))
    ]
    (tmp_path / "queries.yml").write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    out = _run(promtool, "check", "rules", str(tmp_path / "queries.yml"))
    assert out.returncode == 0, out.stdout + out.stderr
