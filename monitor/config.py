"""The configuration Prometheus and Alertmanager run with, made from the one rules file.

- `prometheus_config(...)`: scrape every replica `make serve REPLICAS=N` started (the
  launcher's port scheme: replica k on every base port + 10 k) and the launcher's own
  exporter, each Triton target labelled `replica`; rules and Alertmanager wired in.
- `alertmanager_config(...)`: one receiver with no integration: alerts are seen in its UI
  and API (`/api/v2/alerts`), which is what the integration test reads.
- `prometheus_rule(...)`: the same rules as a Kubernetes PrometheusRule (Prometheus
  Operator); `python -m monitor.config --k8s` writes deploy/k8s/base/prometheusrule.yaml.
"""

from __future__ import annotations

import argparse
import copy
import re
import sys
from pathlib import Path
from typing import Any

import yaml

from launcher.cli import REPLICA_PORT_STEP
from launcher.tritonserver import DEFAULT_PORTS, PROJECT_ROOT

MONITORING = PROJECT_ROOT / "deploy" / "monitoring"
RULES = MONITORING / "rules" / "captioner.rules.yml"
RULE_TESTS = MONITORING / "tests"
DASHBOARD = MONITORING / "dashboard.json"
K8S_RULE = PROJECT_ROOT / "deploy" / "k8s" / "base" / "prometheusrule.yaml"
TRITON_JOB = "captioner-triton"
SUPERVISOR_JOB = "captioner-supervisor"
_DURATION = re.compile(r"^(\d+(ms|s|m|h|d))+$")


def load_rules(path: Path = RULES) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def alerts(rules: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for g in rules["groups"] for r in g["rules"] if "alert" in r]


def with_for(rules: dict[str, Any], duration: str) -> dict[str, Any]:
    """The rules with every alert's `for:` replaced (a test that cannot wait minutes)."""
    if not _DURATION.match(duration):
        raise ValueError(f"not a Prometheus duration: {duration!r}")
    out = copy.deepcopy(rules)
    for rule in alerts(out):
        rule["for"] = duration
    return out


def prometheus_config(
    replicas: int = 1,
    host: str = "127.0.0.1",
    metrics_port: int = DEFAULT_PORTS["metrics"],
    supervisor_port: int | None = None,
    rule_files: tuple[str, ...] = (str(RULES),),
    alertmanager: str | None = "127.0.0.1:9093",
    scrape_interval: str = "15s",
    evaluation_interval: str = "15s",
) -> dict[str, Any]:
    """supervisor_port: the launcher's --supervisor-metrics-port (default metrics + 1); 0: none."""
    if replicas < 1:
        raise ValueError("replicas must be >= 1")
    for d in (scrape_interval, evaluation_interval):
        if not _DURATION.match(d):
            raise ValueError(f"not a Prometheus duration: {d!r}")
    supervisor_port = metrics_port + 1 if supervisor_port is None else supervisor_port
    triton = [
        {"targets": [f"{host}:{metrics_port + REPLICA_PORT_STEP * k}"], "labels": {"replica": str(k)}} for k in range(replicas)
    ]
    scrape = [{"job_name": TRITON_JOB, "metrics_path": "/metrics", "static_configs": triton}]
    if supervisor_port:
        scrape.append(
            {
                "job_name": SUPERVISOR_JOB,
                "metrics_path": "/metrics",
                "static_configs": [{"targets": [f"{host}:{supervisor_port}"]}],
            }
        )
    cfg: dict[str, Any] = {
        "global": {"scrape_interval": scrape_interval, "evaluation_interval": evaluation_interval},
        "rule_files": list(rule_files),
        "scrape_configs": scrape,
    }
    if alertmanager:
        cfg["alerting"] = {"alertmanagers": [{"static_configs": [{"targets": [alertmanager]}]}]}
    return cfg


def alertmanager_config(group_wait: str = "10s", group_interval: str = "1m", repeat_interval: str = "4h") -> dict[str, Any]:
    return {
        "route": {
            "receiver": "on-call",
            "group_by": ["alertname", "instance", "replica"],
            "group_wait": group_wait,
            "group_interval": group_interval,
            "repeat_interval": repeat_interval,
        },
        # No integration here: add email_configs, webhook_configs, pagerduty_configs, ...
        "receivers": [{"name": "on-call"}],
    }


def prometheus_rule(rules: dict[str, Any]) -> dict[str, Any]:
    """The rules file as a PrometheusRule (monitoring.coreos.com/v1): the same groups."""
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "captioner"},
        "spec": {"groups": copy.deepcopy(rules["groups"])},
    }


K8S_HEADER = """\
# GENERATED from deploy/monitoring/rules/captioner.rules.yml by `make monitor-generate`
# (python -m monitor.config --k8s): edit the rules there, not here.
# tests/unit/test_monitoring.py fails when this file is stale.
"""


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (PromQL) as literal blocks, as in the rules file."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)


_Dumper.add_representer(str, _str)


def dump(data: dict[str, Any]) -> str:
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, width=200)


def k8s_rule_text(rules: dict[str, Any]) -> str:
    return K8S_HEADER + dump(prometheus_rule(rules))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m monitor.config", description=__doc__.splitlines()[0])
    p.add_argument("--k8s", action="store_true", help=f"write {K8S_RULE.relative_to(PROJECT_ROOT)} from the rules")
    p.add_argument("--replicas", type=int, default=1, help="print prometheus.yml for this many replicas")
    a = p.parse_args(argv)
    if a.k8s:
        K8S_RULE.write_text(k8s_rule_text(load_rules()))
        print(f"wrote {K8S_RULE.relative_to(PROJECT_ROOT)}")
        return 0
    sys.stdout.write(dump(prometheus_config(a.replicas)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
