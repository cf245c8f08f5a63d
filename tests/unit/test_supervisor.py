"""launcher.supervisor: what it sees as broken and what it does about it, with a fake
server, fake stubs, a fake probe and a fake model-control client (no tritonserver)."""

from __future__ import annotations

import os
import time

import pytest

from launcher import supervisor as sv
from launcher.tritonserver import ServerError

METRICS = """# HELP nv_inference_exec_count Number of model executions performed
# TYPE nv_inference_exec_count counter
nv_inference_exec_count{model="encoder",version="1"} 12
nv_inference_exec_count{model="preprocess",version="1"} 30
nv_inference_pending_request_count{model="encoder",version="1"} 3
nv_inference_pending_request_count{model="preprocess",version="1"} 0
nv_inference_queue_duration_us{model="encoder",version="1"} 999
"""


def test_parse_metrics_reads_the_named_series_per_model():
    m = sv.parse_metrics(METRICS, ("nv_inference_exec_count", "nv_inference_pending_request_count"))
    assert m == {
        "nv_inference_exec_count": {"encoder": 12.0, "preprocess": 30.0},
        "nv_inference_pending_request_count": {"encoder": 3.0, "preprocess": 0.0},
    }


def test_a_model_is_hung_only_when_requests_wait_and_nothing_executes_for_the_timeout():
    w = sv.HangWatch(timeout_s=5.0)
    assert w.update({"encoder": 2}, {"encoder": 10}, now=0.0) == []
    assert w.update({"encoder": 2}, {"encoder": 10}, now=4.0) == []
    assert w.update({"encoder": 2}, {"encoder": 10}, now=5.5) == ["encoder"]
    # progress resets the clock
    assert w.update({"encoder": 2}, {"encoder": 11}, now=6.0) == []
    assert w.update({"encoder": 2}, {"encoder": 11}, now=10.0) == []
    # idle (nothing pending) is not hung, however long
    assert w.update({"encoder": 0}, {"encoder": 11}, now=100.0) == []
    assert w.update({"encoder": 0}, {"encoder": 11}, now=200.0) == []


def test_a_stub_that_keeps_computing_is_slow_not_hung_until_far_past_the_timeout():
    w = sv.HangWatch(timeout_s=5.0, busy_factor=4.0)
    assert w.update({"encoder": 9}, {"encoder": 3}, now=0.0, cpu={"encoder": 10.0}) == []
    assert w.update({"encoder": 9}, {"encoder": 3}, now=6.0, cpu={"encoder": 16.0}) == []  # busy: a heavy batch
    assert w.update({"encoder": 9}, {"encoder": 3}, now=19.0, cpu={"encoder": 29.0}) == []
    assert w.update({"encoder": 9}, {"encoder": 3}, now=21.0, cpu={"encoder": 31.0}) == ["encoder"]  # 4 x 5 s
    # the same stall with a stub that uses no CPU: hung at the plain timeout
    w = sv.HangWatch(timeout_s=5.0)
    assert w.update({"encoder": 9}, {"encoder": 3}, now=0.0, cpu={"encoder": 10.0}) == []
    assert w.update({"encoder": 9}, {"encoder": 3}, now=6.0, cpu={"encoder": 10.01}) == ["encoder"]


def test_one_instance_stuck_in_an_execute_is_hung_while_its_sibling_keeps_the_model_moving():
    """Two instances of a model: the metrics' execution count keeps moving (the healthy
    one), so only the instance's own clock shows the stuck one."""
    w = sv.HangWatch(timeout_s=5.0)
    live = {"preprocess_0_0": 11, "preprocess_0_1": 12}
    stuck = {"preprocess_0_0": (11, 100.0)}
    assert w.instances(stuck, live, now=101.0, cpu={"preprocess_0_0": 3.0}) == []
    assert w.instances(stuck, live, now=104.0, cpu={"preprocess_0_0": 3.0}) == []
    assert w.instances(stuck, live, now=105.5, cpu={"preprocess_0_0": 3.0}) == ["preprocess_0_0"]
    # a new execute of the same instance starts its own clock
    assert w.instances({"preprocess_0_0": (11, 105.4)}, live, now=106.0, cpu={"preprocess_0_0": 3.1}) == []
    # an instance computing hard in one execute is slow, not hung, until 4x the bound
    w = sv.HangWatch(timeout_s=5.0)
    busy = {"preprocess_0_1": (12, 0.0)}
    assert w.instances(busy, live, now=1.0, cpu={"preprocess_0_1": 1.0}) == []
    assert w.instances(busy, live, now=8.0, cpu={"preprocess_0_1": 8.0}) == []
    assert w.instances(busy, live, now=21.0, cpu={"preprocess_0_1": 21.0}) == ["preprocess_0_1"]
    # a killed stub's stale clock (another pid holds that name now, or none) is ignored
    assert w.instances({"preprocess_0_0": (99, 0.0)}, live, now=50.0) == []
    assert w.instances({"gone_0_0": (11, 0.0)}, live, now=50.0) == []


def test_one_instance_frozen_between_executes_is_hung_once_its_heartbeat_is_silent():
    """A stub stopped while idle: its execute clock says idle, its sibling keeps the model
    moving; its heartbeat stops, and with no CPU used that is a hang at the plain bound."""
    w = sv.HangWatch(timeout_s=5.0)
    live = {"preprocess_0_0": 11, "preprocess_0_1": 12}
    beats = {"preprocess_0_0": (11, 100.0), "preprocess_0_1": (12, 104.9)}
    assert w.instances(beats, live, now=101.0, cpu={"preprocess_0_0": 3.0}, kind="heartbeat") == []
    # the execute clocks are watched on their own: one kind does not forget the other's
    assert w.instances({"preprocess_0_1": (12, 100.0)}, live, now=101.0, kind="execute") == []
    assert w.instances(beats, live, now=105.5, cpu={"preprocess_0_0": 3.0}, kind="heartbeat") == ["preprocess_0_0"]
    assert w.instances({"preprocess_0_1": (12, 100.0)}, live, now=105.5, kind="execute") == ["preprocess_0_1"]
    # a fresh beat clears it
    assert w.instances({"preprocess_0_0": (11, 105.4)}, live, now=106.0, kind="heartbeat") == []
    # a stub computing so hard that its heartbeat thread starves: slow, until 4x the bound
    w = sv.HangWatch(timeout_s=5.0)
    starved = {"preprocess_0_1": (12, 0.0)}
    assert w.instances(starved, live, now=1.0, cpu={"preprocess_0_1": 1.0}, kind="heartbeat") == []
    assert w.instances(starved, live, now=8.0, cpu={"preprocess_0_1": 8.0}, kind="heartbeat") == []
    assert w.instances(starved, live, now=21.0, cpu={"preprocess_0_1": 21.0}, kind="heartbeat") == ["preprocess_0_1"]


def test_the_heartbeat_beats_until_closed(tmp_path):
    from captioner.serving.triton import ExecuteClock, executing_since, heartbeats

    clock = ExecuteClock("m_0_0", tmp_path, heartbeat_s=0.02)
    try:
        first = heartbeats(tmp_path)["m_0_0"]
        assert first[0] == os.getpid()
        deadline = time.monotonic() + 10
        while heartbeats(tmp_path)["m_0_0"][1] == first[1] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert heartbeats(tmp_path)["m_0_0"][1] > first[1]
        assert executing_since(tmp_path) == {}  # the heartbeats are not executes
    finally:
        clock.close()
    last = heartbeats(tmp_path)["m_0_0"]
    time.sleep(0.1)
    assert heartbeats(tmp_path)["m_0_0"] == last
    assert heartbeats(tmp_path / "missing") == {}


def test_execute_clock_files_say_who_is_inside_an_execute(tmp_path):
    from captioner.serving.triton import ExecuteClock, executing_since

    a, b = ExecuteClock("m_0_0", tmp_path), ExecuteClock("m_0_1", tmp_path)
    assert executing_since(tmp_path) == {}
    with a:
        inside = executing_since(tmp_path)
        assert list(inside) == ["m_0_0"] and inside["m_0_0"][0] == os.getpid()
        assert abs(inside["m_0_0"][1] - time.monotonic()) < 5
    with pytest.raises(ValueError):
        with b:
            assert set(executing_since(tmp_path)) == {"m_0_1"}
            raise ValueError("an execute that raises still leaves the clock")
    assert executing_since(tmp_path) == {}
    assert executing_since(tmp_path / "missing") == {}
    a.close()
    b.close()
    with ExecuteClock("m_0_0", folder=""):  # no supervisor: nothing written, nothing fails
        pass


class FakeProcess:
    def __init__(self, pid=100):
        self.pid, self.returncode = pid, None

    def poll(self):
        return self.returncode


class FakeServer:
    metrics_url = "http://127.0.0.1:1/metrics"

    def __init__(self):
        self.process = FakeProcess()
        self.starts, self.kills, self.fail_start = 0, 0, False

    def running(self):
        return self.process is not None and self.process.returncode is None

    def kill(self):
        self.kills += 1
        self.process = None

    def start(self, keep_ports=False):
        assert keep_ports, "a restart must keep the ports clients know"
        if self.fail_start:
            raise ServerError("port in use")
        self.starts += 1
        self.process = FakeProcess(pid=100 + self.starts)
        return self


class FakeControl:
    def __init__(self):
        self.calls = []
        self.state = {m: "READY" for m in ("captioner", "preprocess", "encoder", "caption_generator", "decoder_step")}

    def unload_model(self, name, headers=None):
        self.calls.append(("unload", name, headers))
        self.state[name] = "UNAVAILABLE"
        if name != "captioner":
            self.state["captioner"] = "UNAVAILABLE"  # the ensemble goes with its step

    def load_model(self, name, headers=None):
        self.calls.append(("load", name, headers))
        self.state[name] = "READY"

    def get_model_repository_index(self, headers=None):
        return [{"name": k, "state": v} for k, v in self.state.items()]


class FakeProbe:
    def __init__(self):
        self.results, self.resets = [], 0

    def poll(self):
        out, self.results = self.results, []
        return out

    def reset(self):
        self.resets += 1


@pytest.fixture
def world(monkeypatch):
    stubs = {
        "preprocess": [sv.Stub(1, "preprocess", "preprocess_0_0")],
        "encoder": [sv.Stub(2, "encoder", "encoder_0_0")],
        "caption_generator": [sv.Stub(3, "caption_generator", "caption_generator_0_0")],
    }
    killed = []
    monkeypatch.setattr(sv, "stubs_of", lambda pid: [s for group in stubs.values() for s in group])
    monkeypatch.setattr(sv, "_kill", killed.append)
    monkeypatch.setattr(sv.Supervisor, "hung_models", lambda self: {})
    monkeypatch.setattr(sv.time, "sleep", lambda s: None)
    server, control, probe = FakeServer(), FakeControl(), FakeProbe()
    sup = sv.Supervisor(server, probe, control, headers={"key": "v"}, max_restarts=2)
    sup.snapshot()
    return sup, server, control, probe, stubs, killed


def test_healthy_server_is_left_alone(world):
    sup, server, control, probe, *_ = world
    probe.results = [None, None]
    assert sup.check() is None
    assert control.calls == [] and server.kills == 0


def test_a_dead_stub_is_unloaded_then_its_model_and_the_ensemble_are_loaded_again(world):
    sup, server, control, probe, stubs, killed = world
    stubs["encoder"] = []  # the stub process is gone
    assert sup.check() == "repaired"
    assert control.calls[0] == ("unload", "encoder", {"key": "v"})  # readiness false first
    assert ("load", "encoder", {"key": "v"}) in control.calls
    assert ("load", "captioner", {"key": "v"}) in control.calls
    assert all(s == "READY" for s in control.state.values())
    assert server.kills == 0  # a reload, not a restart
    assert [e["event"] for e in sup.events] == ["model_broken", "model_reloaded"]


def test_a_server_that_wedges_during_a_repair_is_restarted(world):
    """Seen in CI: a stub SIGKILLed while holding a shared-memory lock made tritonserver
    abort without exiting; the unload call then hung. It times out (the launcher's
    control client: 5 s) and the server is restarted, instead of waiting a minute."""
    sup, server, control, probe, stubs, killed = world

    def wedged(name, headers=None):
        raise TimeoutError("timed out")

    control.unload_model = wedged
    stubs["caption_generator"] = []
    assert sup.check() == "repaired"  # the repair failed over to a restart
    assert [e["event"] for e in sup.events] == ["model_broken", "reload_failed", "restart", "restarted"]
    assert server.kills == 1


def test_a_stub_triton_reports_unhealthy_is_repaired_and_its_remaining_processes_killed(world):
    sup, server, control, probe, stubs, killed = world
    probe.results = ["[500] in ensemble 'captioner', Stub process 'encoder_0_0' is not healthy."]
    assert sup.check() == "repaired"
    assert killed == [2]  # a stopped or hung stub never finishes its unload on its own
    assert control.calls[0][:2] == ("unload", "encoder")


def test_repeated_probe_failures_restart_the_server_and_overload_is_not_a_failure(world):
    sup, server, control, probe, *_ = world
    probe.results = ["connection refused", "connection refused"]
    assert sup.check() is None and server.kills == 0
    probe.results = ["connection refused"]
    assert sup.check() == "restarted"
    assert server.kills == 1 and server.starts == 1
    assert probe.resets >= 1  # results of probes sent to the old server are dropped


def test_a_dead_server_is_restarted_on_its_ports_and_restarts_are_bounded(world):
    sup, server, control, probe, *_ = world
    server.process.returncode = -9
    assert sup.check() == "restarted" and server.starts == 1
    server.process.returncode = -9
    assert sup.check() == "restarted" and server.starts == 2
    server.process.returncode = -9
    with pytest.raises(sv.GiveUp):
        sup.check()
    assert [e["event"] for e in sup.events].count("restart") == 2 and sup.events[-1]["event"] == "give_up"


def test_a_failed_restart_is_retried_at_the_next_check(world):
    sup, server, control, probe, *_ = world
    server.process.returncode = 1
    server.fail_start = True
    assert sup.check() == "restarted" and server.process is None
    server.fail_start = False
    assert sup.check() == "restarted" and server.running()


def test_no_restart_while_the_launcher_drains(world):
    sup, server, control, probe, *_ = world
    sup._stopping = lambda: True
    server.process.returncode = 0
    sup.check()
    assert server.starts == 0


def test_background_probe_drops_results_from_before_a_reset():
    import threading

    gate = threading.Event()
    probe = sv.BackgroundProbe(lambda: (gate.wait(5), "failed")[1], interval_s=0.01).start()
    probe.reset()  # the probe in flight started before: its result must not count
    gate.set()
    import time

    deadline = time.monotonic() + 5
    seen = []
    while time.monotonic() < deadline and not seen:
        seen = probe.poll()
        time.sleep(0.01)
    probe.stop()
    assert seen and all(r == "failed" for r in seen)  # later probes (new generation) do count


def test_stubs_of_reads_model_and_instance_from_the_stub_command_line(monkeypatch):
    class P:
        def __init__(self, pid, cmd, status="sleeping"):
            self.pid, self._cmd, self._status = pid, cmd, status

        def status(self):
            return self._status

        def cmdline(self):
            return self._cmd

    stub = "/x/backends/python/triton_python_backend_stub"
    children = [
        P(5, [stub, "/repo/encoder/1/model.py", "shm", "1", "1", "9", "/x", "336", "encoder_0_0", "DEFAULT"]),
        P(6, [stub, "/repo/preprocess/1/model.py", "shm", "1", "1", "9", "/x", "336", "preprocess_0_0", "DEFAULT"], "zombie"),
        P(7, ["/usr/bin/something-else"]),
        # the model's own stub, named after the model: Triton runs it only while it loads the
        # model, so it is never watched (its exit is no failure)
        P(8, [stub, "/repo/preprocess/2/model.py", "shm", "1", "1", "9", "/x", "336", "preprocess", "DEFAULT"]),
    ]

    class Root:
        def children(self):
            return children

    monkeypatch.setattr(sv.psutil, "Process", lambda pid: Root())
    assert sv.stubs_of(1) == [sv.Stub(5, "encoder", "encoder_0_0")]  # a zombie is a dead stub


def test_drain_unloads_the_ensemble_and_waits_for_requests_in_flight():
    control = FakeControl()
    assert sv.drain(control, "captioner", timeout_s=1.0, headers={"k": "v"})
    assert control.calls == [("unload", "captioner", {"k": "v"})]

    class Busy(FakeControl):  # in-flight requests keep the ensemble UNLOADING
        def unload_model(self, name, headers=None):
            super().unload_model(name, headers)
            self.state[name] = "UNLOADING"

    assert not sv.drain(Busy(), "captioner", timeout_s=0.2)


def test_a_rollout_is_followed_and_a_stub_of_the_new_version_killed_after_it_is_repaired(world):
    """launcher/rollout.py loads version 2 beside 1, switches, unloads 1: the stubs of the
    version unloaded on purpose are not dead, those of the version loaded since are watched."""
    sup, server, control, probe, stubs, killed = world
    versions = {m: {1: "READY"} for m in control.state}
    control.get_model_repository_index = lambda headers=None: [
        {"name": m, "version": str(v), "state": s} for m, vs in versions.items() for v, s in vs.items()
    ]
    # version 2 loaded beside 1
    for m, group in stubs.items():
        versions[m][2] = "READY"
        group.append(sv.Stub(group[0].pid + 10, m, group[0].instance, 2))
    assert sup.check() is None
    assert [e["model"] for e in sup.events if e["event"] == "version_watched"] == list(stubs)
    # switched, version 1 unloaded: its stubs go away on purpose
    for m, group in stubs.items():
        versions[m][1] = "UNAVAILABLE"
        group[:] = [s for s in group if s.version == 2]
    assert sup.check() is None and control.calls == []
    # a stub of the serving version 2 dies: repaired
    stubs["encoder"] = []
    assert sup.check() == "repaired"
    assert control.calls[0] == ("unload", "encoder", {"key": "v"})


def test_stubs_of_tells_versions_apart(monkeypatch):
    class P:
        def __init__(self, pid, version):
            self.pid, self.version = pid, version

        def status(self):
            return "sleeping"

        def cmdline(self):
            return [
                "/x/triton_python_backend_stub",
                f"/repo/encoder/{self.version}/model.py",
                "shm",
                "1",
                "1",
                "9",
                "/x",
                "336",
                "encoder_0_0",
                "DEFAULT",
            ]

    class Root:
        def children(self):
            return [P(5, 1), P(6, 2)]

    monkeypatch.setattr(sv.psutil, "Process", lambda pid: Root())
    one, two = sv.stubs_of(1)
    assert (one.version, two.version) == (1, 2) and one.instance == two.instance and one.key != two.key
