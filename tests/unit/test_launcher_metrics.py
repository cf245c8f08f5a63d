"""launcher.metrics: the supervisor's events and the deep probe's results as bounded
Prometheus series, driven through the real Supervisor with a fake server (no tritonserver)."""

from __future__ import annotations

import os
import time
import urllib.request

import pytest
from test_supervisor import FakeControl, FakeProbe, FakeServer

from launcher import supervisor as sv
from launcher.metrics import PROBE_BUCKETS, REPAIR_CAUSES, RESTART_CAUSES, LauncherMetrics, model_info
from launcher.tritonserver import free_port


def _value(metrics, name, **labels):
    return metrics.registry.get_sample_value(name, labels)


@pytest.fixture
def supervised(monkeypatch, tmp_path):
    """A Supervisor whose stubs are this process (so a stamp it writes is a live stub's),
    recording into fresh metrics."""
    stubs = {m: [sv.Stub(os.getpid(), m, f"{m}_0_0")] for m in ("preprocess", "caption_generator")}
    monkeypatch.setattr(sv, "stubs_of", lambda pid: [s for group in stubs.values() for s in group])
    monkeypatch.setattr(sv, "_kill", lambda pid: None)
    server = FakeServer()
    server.executing_dir = tmp_path / "executing"
    server.executing_dir.mkdir()
    probe = FakeProbe()
    sup = sv.Supervisor(server, probe, FakeControl(), hang_timeout_s=0.05, backoff_s=0.01, max_restarts=10)
    metrics = LauncherMetrics()
    recorder = metrics.replica(0, sorted(stubs), ready=lambda: True, repo=tmp_path)
    sup.on_event = recorder.event
    sup.snapshot()
    return sup, server, probe, stubs, metrics


def test_every_series_exists_at_zero_before_anything_happens(supervised):
    *_, metrics = supervised
    for model in ("preprocess", "caption_generator"):
        for cause in REPAIR_CAUSES:
            assert _value(metrics, "captioner_supervisor_repairs_total", replica="0", model=model, cause=cause) == 0
    for cause in RESTART_CAUSES:
        assert _value(metrics, "captioner_supervisor_restarts_total", replica="0", cause=cause) == 0
    for result in ("ok", "shed", "failed"):
        assert _value(metrics, "captioner_probe_total", replica="0", result=result) == 0
    assert _value(metrics, "captioner_supervisor_gave_up", replica="0") == 0
    assert _value(metrics, "captioner_replica_ready", replica="0") == 1


def test_a_dead_stub_counts_as_a_repair_of_its_model_caused_by_a_stub_that_died(supervised):
    sup, server, probe, stubs, metrics = supervised
    stubs["caption_generator"] = []
    assert sup.check() == "repaired"
    assert _value(metrics, "captioner_supervisor_repairs_total", replica="0", model="caption_generator", cause="stub_died") == 1
    assert _value(metrics, "captioner_supervisor_repairs_total", replica="0", model="preprocess", cause="stub_died") == 0


def test_a_stub_stuck_in_an_execute_counts_as_hung(supervised):
    from captioner.serving.triton import ExecuteClock

    sup, server, probe, stubs, metrics = supervised
    clock = ExecuteClock("preprocess_0_0", server.executing_dir)
    try:
        with clock:
            time.sleep(0.5)  # past the bound even for a busy stub (4 x 0.05 s)
            assert sup.check() == "repaired"
    finally:
        clock.close()
    assert _value(metrics, "captioner_supervisor_repairs_total", replica="0", model="preprocess", cause="stub_hung") == 1


def test_a_stub_triton_reports_unhealthy_is_counted_so(supervised):
    sup, server, probe, stubs, metrics = supervised
    probe.results = ["[500] in ensemble 'captioner', Stub process 'preprocess_0_0' is not healthy."]
    assert sup.check() == "repaired"
    assert _value(metrics, "captioner_supervisor_repairs_total", replica="0", model="preprocess", cause="stub_unhealthy") == 1


def test_restarts_are_counted_by_cause_and_giving_up_is_flagged(supervised):
    sup, server, probe, stubs, metrics = supervised
    server.process.returncode = -9
    assert sup.check() == "restarted"
    probe.results = ["connection refused"] * 3
    assert sup.check() == "restarted"
    assert _value(metrics, "captioner_supervisor_restarts_total", replica="0", cause="server_exited") == 1
    assert _value(metrics, "captioner_supervisor_restarts_total", replica="0", cause="probe_failed") == 1
    sup.max_restarts = 2
    server.process.returncode = 1
    with pytest.raises(sv.GiveUp):
        sup.check()
    assert _value(metrics, "captioner_supervisor_gave_up", replica="0") == 1


def test_probes_are_counted_by_result_and_only_answers_time_the_histogram():
    metrics = LauncherMetrics()
    rec = metrics.replica(1, ["preprocess"])
    rec.probe("ok", 0.3)
    rec.probe("ok", 4.0)
    rec.probe("shed", 0.001)
    rec.probe("failed", 10.0)
    assert _value(metrics, "captioner_probe_total", replica="1", result="ok") == 2
    assert _value(metrics, "captioner_probe_total", replica="1", result="shed") == 1
    assert _value(metrics, "captioner_probe_total", replica="1", result="failed") == 1
    assert _value(metrics, "captioner_probe_duration_seconds_count", replica="1") == 2
    assert _value(metrics, "captioner_probe_duration_seconds_bucket", replica="1", le="0.5") == 1
    assert _value(metrics, "captioner_probe_duration_seconds_bucket", replica="1", le="5.0") == 2
    with pytest.raises(ValueError, match="probe result"):
        rec.probe("weird", 1.0)
    assert sorted(PROBE_BUCKETS) == list(PROBE_BUCKETS)


def test_model_info_comes_from_the_parameters_the_builder_writes(tmp_path):
    assert model_info(tmp_path) is None
    (tmp_path / "captioner").mkdir()
    params = {
        "checkpoint_sha256": "1e5bda0654459f4d2d92",
        "target": "cpu",
        "precision": "fp32",
        "layout": "fused",
        "encoder_runtime": "openvino",
    }
    (tmp_path / "captioner" / "config.pbtxt").write_text(
        'name: "captioner"\nplatform: "ensemble"\n'
        + "".join(f'parameters {{\n  key: "{k}"\n  value {{\n    string_value: "{v}"\n  }}\n}}\n' for k, v in params.items())
    )
    want = {"checkpoint": "1e5bda065445", "target": "cpu", "precision": "fp32", "layout": "fused", "encoder_runtime": "openvino"}
    assert model_info(tmp_path) == want
    metrics = LauncherMetrics()
    metrics.replica(0, [], ready=lambda: False, repo=tmp_path)
    assert _value(metrics, "captioner_model_info", replica="0", **want) == 1
    assert _value(metrics, "captioner_replica_ready", replica="0") == 0


def test_model_info_reads_a_repository_the_builder_assembled():
    from launcher.tritonserver import PROJECT_ROOT

    repo = PROJECT_ROOT / "model_repository"
    if not (repo / "captioner" / "config.pbtxt").is_file():
        pytest.skip("no model repository built here (make build-engines)")
    from builder.repository_check import recorded_checkpoint

    info = model_info(repo)
    assert info is not None and info["checkpoint"] == recorded_checkpoint(repo)[:12]
    assert info["target"] in ("cpu", "gpu") and all(info.values())


def test_the_exporter_serves_the_series_over_http():
    metrics = LauncherMetrics()

    def broken():
        raise OSError("connection refused")

    metrics.replica(0, ["preprocess"], ready=broken)
    port = free_port()
    metrics.serve(port)
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    finally:
        metrics.close()
    assert 'captioner_supervisor_repairs_total{cause="stub_died",model="preprocess",replica="0"} 0.0' in text
    assert 'captioner_replica_ready{replica="0"} 0.0' in text  # a readiness check that raises is "not ready"
