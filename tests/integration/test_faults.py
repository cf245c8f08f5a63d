"""`make faults` in its quick mode, against real supervised servers: asserted outcomes
(recovered, nothing lost, refused fast), never timings that flake. The full mode with
its figures is the report (`make faults`, reports/faults.md)."""

from __future__ import annotations

import json

import pytest

from bench import faults

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("faults")
    assert faults.main(["--quick", "--out", str(out), "--work", str(out / "work")]) == 0
    results = json.loads((out / "faults.json").read_text())
    assert (out / "faults.md").read_text().startswith("# Fault scenarios (quick)")
    return {(r["scenario"], r.get("target")): r for r in results["scenarios"]}


def test_overload_is_shed_fast_and_the_server_recovers(report):
    r = report[("overload", None)]
    o = r["overload"]
    assert o["refusals"] > 0, "128 clients never overflowed the quick repository's queues"
    assert o["other_errors"] == 0, o["error_samples"]
    assert o["good"] > 0
    # refused with UNAVAILABLE well before the caller's deadline, not after waiting it out
    assert o["refusal_p50_ms"] < o["deadline_s"] * 1e3 / 2
    assert r["recovered_s"] is not None
    # the liveness probe an orchestrator runs found the overloaded replica alive throughout
    live = r["liveness"]
    assert live["probes"] > 0 and live["failed"] == 0, live["failures"]


def test_a_killed_stub_is_detected_and_repaired_and_clients_with_retries_lose_nothing(report):
    killed = {target: r for (scenario, target), r in report.items() if scenario == "stub-kill"}
    # every model on the caption's path that runs in a stub: LAYOUT=auto builds the small
    # model whole (preprocess alone); fused and split add caption_generator
    assert "preprocess" in killed
    for target, r in killed.items():
        assert r["not_ready_after_s"] is not None, f"{target}: readiness never said NOT ready while broken"
        assert r["repaired_after_s"] is not None, f"{target}: never ready again: {r['supervisor']}"
        assert r["captions_again_after_s"] is not None, r["supervisor"]
        assert r["lost"] == 0, (r["lost_samples"], r["supervisor"])


def test_a_stopped_stub_is_repaired(report):
    (r,) = [r for (scenario, _), r in report.items() if scenario == "hang"]
    assert r["target"] in ("encoder", "preprocess")  # the model that runs the encoder
    # the front model has two instances: captions go on through the other one, so only
    # the supervisor's repair (readiness false, then true again) shows the hang was found
    assert r["not_ready_after_s"] is not None and r["repaired_after_s"] is not None, r["supervisor"]
    assert any("model_broken model=preprocess" in e for e in r["supervisor"]), r["supervisor"]
    assert r["captions_again_after_s"] is not None, r["supervisor"]
    assert r["lost"] == 0, (r["lost_samples"], r["supervisor"])


def test_a_stub_frozen_between_executes_is_repaired(report):
    """Stopped while idle: no execute clock runs and the sibling instance keeps captions
    flowing, so only its silent heartbeat (or Triton's "not healthy") shows it."""
    (r,) = [r for (scenario, _), r in report.items() if scenario == "hang-idle"]
    assert r["stopped"] == "between executes"
    assert r["not_ready_after_s"] is not None and r["repaired_after_s"] is not None, r["supervisor"]
    assert any(f"model_broken model={r['target']}" in e for e in r["supervisor"]), r["supervisor"]
    assert r["lost"] == 0, (r["lost_samples"], r["supervisor"])


def test_a_killed_tritonserver_is_restarted_without_orphans(report):
    r = report[("server-kill", None)]
    assert r["captions_again_after_s"] is not None, r["supervisor"]
    assert r["orphaned_stubs_left"] == 0
    assert r["lost"] == 0, (r["lost_samples"], r["supervisor"])


def test_a_server_aborting_during_a_repair_is_restarted_at_once_and_clients_lose_nothing(report):
    """The Python backend's abort when a killed stub held its shared-memory lock: the
    endpoints close, the process lingers. The reload is given up (not waited out for its
    timeout while every client is refused) and the server restarted."""
    (r,) = [r for (scenario, _), r in report.items() if scenario == "abort-in-repair"]
    events = r["supervisor"]
    # "by itself": the kill alone made tritonserver abort, before the repair began
    assert r["abort"] in ("SIGABRT during the repair", "by itself"), f"no abort seen: {events}"
    assert any("restarted" in e for e in events), events
    assert not any("reload_failed" in e and "TimeoutError" in e for e in events), events
    assert r["ready_again_after_abort_s"] is not None, events
    assert r["lost"] == 0, (r["lost_samples"], events)


def test_sigterm_drains_every_accepted_request(report):
    r = report[("drain", None)]
    assert r["in_flight_at_sigterm"] > 0
    assert r["accepted_lost"] == 0, r["accepted_lost_by_status"]
    assert r["launcher_exit"] == 0


def test_soak_fails_nothing(report):
    r = report[("soak", None)]
    assert r["requests"] > 0 and r["failed"] == 0


def test_a_rollout_and_rollback_under_plain_clients_lose_nothing_and_never_mix_versions(report):
    r = report[("rollout", None)]
    assert r["failed"] == 0, r["failed_samples"]
    assert r["wrong_version_caption"] == 0 and r["matching_neither"] == 0, r["wrong_samples"]
    assert all(n > 0 for n in r["by_version"].values()), r["by_version"]  # both versions answered
    assert r["first_new_caption_after_command_s"] is not None
    model_ready = r["readiness"]["/v2/models/captioner/ready"]
    assert model_ready["not_ready"] == 0, (model_ready, r["phase_windows_s"], r["supervisor"])  # never answered NOT ready
    # a poll the busy 2 cores did not answer within 2 s is no NOT ready, but stays rare
    assert model_ready["unanswered"] <= max(2, model_ready["polls"] // 20), model_ready
    # a stub of the version served after the rollback, killed: repaired on that version
    assert r["repair_after"]["label_ok"] and r["repair_after"]["caption_ok"], (r["repair_after"], r["supervisor"])
