"""The bench's peers without their frameworks: the pipeline every peer runs (same captions
as the in-process bound), the launcher's command lines and venv pins, the T1/T2 verdicts,
the side-by-side table and plots."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from serving_support import scene_png, tiny_checkpoint

from bench.peers import launch, targets, venv
from bench.peers import report as peers_report
from bench.peers.pipeline import PeerSpec, Pipeline, read_batch_logs
from bench.peers.run import chosen_variants, peer_spec
from bench.run import parse_args
from bench.variants import ModelSpec
from captioner.serving import Rejected


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    from builder.export import export_decoder_step, export_encoder
    from captioner import checkpoint

    d = tmp_path_factory.mktemp("peer_model")
    tiny_checkpoint(d)
    ck = checkpoint.load(d)
    return d, export_encoder(ck, d / "enc.onnx"), export_decoder_step(ck, d / "dec.onnx")


def _paths(enc, dec, runtime="onnxruntime"):
    return {"encoder": enc, "decoder": dec, "runtime": runtime, "step_runtime": "onnxruntime", "inference_precision": "fp32"}


def test_the_peer_pipeline_captions_like_the_inprocess_bound_and_refuses_per_request(graphs, tmp_path):
    from bench.stacks import captioner

    ckdir, enc, dec = graphs
    spec = ModelSpec("tiny", ckdir, None)
    path = peer_spec(spec, _paths(enc, dec), 32, tmp_path / "cache").write(tmp_path / "peer.json")
    pipe = Pipeline(PeerSpec.read(path), threads=1, batch_log_dir=tmp_path / "batches")
    images = [scene_png(i) for i in range(5)]
    expected = captioner(spec, _paths(enc, dec), threads=1).caption_bytes(images)
    assert pipe(images) == expected and all(expected)
    out = pipe([b"not an image", images[0], images[1]], [None, {"max_length": 2}, {"beam": 3}])
    assert isinstance(out[0], Rejected) and out[0].reason == "not_an_image"
    assert len(out[1].split()) <= 2 and expected[0].startswith(out[1])
    assert isinstance(out[2], Rejected) and "beam" in out[2].message
    assert read_batch_logs(tmp_path / "batches")[:2] == (2, 8)  # two batches, eight requests


def test_a_peer_spec_names_its_problem(tmp_path):
    bad = tmp_path / "spec.json"
    bad.write_text("{}")
    with pytest.raises(ValueError, match="spec.json"):
        PeerSpec.read(bad)
    with pytest.raises(ValueError, match="runtime"):
        PeerSpec("e", "d", "tensorrt", "onnxruntime", "fp32", [], {}, 8, 0.7, 32)


def test_server_commands_run_the_peer_module_in_its_venv_with_its_sizing():
    cfg = launch.PeerConfig(workers=2, threads=1, max_batch_size=32)
    ray = launch.server_command("ray", "/v/ray/bin/python", "s.json", 8000, cfg, "/tmp/b")
    assert ray[:3] == ["/v/ray/bin/python", "-m", "bench.peers.ray_server"]
    flags = dict(zip(ray[3::2], ray[4::2]))
    assert flags == {
        "--spec": "s.json",
        "--port": "8000",
        "--workers": "2",
        "--threads": "1",
        "--max-batch-size": "32",
        "--batch-wait-ms": "0",
        "--batch-log-dir": "/tmp/b",
    }
    ml = launch.server_command("mlserver", "py", "s.json", 8000, cfg, grpc_port=8001)
    assert ml[2] == "bench.peers.mlserver_server" and ml[ml.index("--grpc-port") + 1] == "8001"
    assert ml[ml.index("--batch-wait-ms") + 1] == "1"  # MLServer does not batch without a wait
    waited = launch.server_command("litserve", "py", "s", 1, launch.PeerConfig(batch_wait_ms=2.5))
    assert waited[waited.index("--batch-wait-ms") + 1] == "2.5"
    with pytest.raises(ValueError, match="grpc_port"):
        launch.server_command("mlserver", "py", "s.json", 8000, cfg)
    with pytest.raises(ValueError, match="unknown peer"):
        launch.server_command("torchserve", "py", "s.json", 8000, cfg)
    with pytest.raises(ValueError):
        launch.PeerConfig(workers=0)
    env = launch.server_env({"PYTHONPATH": "/elsewhere"})
    assert env["PYTHONPATH"].split(":") == [str(venv.ROOT), "/elsewhere"]


def test_peer_venvs_pin_the_framework_and_the_projects_runtime_versions(tmp_path):
    project = {
        line.split("==")[0].lower(): line.strip()
        for line in (venv.ROOT / "requirements.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    }
    for name in venv.PEERS:
        reqs = venv.requirements(name)
        assert all("==" in r for r in reqs)
        assert {p: project[p] for p in venv.SHARED} == {r.split("==")[0].lower(): r for r in reqs[-len(venv.SHARED) :]}
        cmds = venv.create_commands(name, tmp_path, base_python="/usr/bin/python3.11")
        assert cmds[0] == ["/usr/bin/python3.11", "-m", "venv", "--clear", str(tmp_path / name)]
        assert cmds[-1][0] == str(tmp_path / name / "bin" / "python") and cmds[-1][-len(reqs) :] == reqs
        assert not venv.ready(name, tmp_path)
    loose = tmp_path / "requirements.txt"
    loose.write_text("numpy>=1\nonnxruntime==1\nopenvino==2\npillow==3\n")
    with pytest.raises(ValueError, match="exact pin"):
        venv.shared_pins(loose)
    loose.write_text("numpy==1\n")
    with pytest.raises(ValueError, match="onnxruntime"):
        venv.shared_pins(loose)


def _lv(stack, c, tput, p50=10.0, p99=50.0, variant="openvino fp32", model="default"):
    return dict(
        model=model,
        stack=stack,
        variant=variant,
        concurrency=c,
        throughput=tput,
        completed=100,
        errors=0,
        p50_ms=p50,
        p95_ms=p99,
        p99_ms=p99,
        client_cpu=0.1,
        server_cpu=0.8,
        peak_rss_mib=900.0,
        peak_pss_mib=600.0,
        models={"peer": {"batch": 7.5}} if stack != "triton" else {"preprocess": {"batch": 9.0}},
    )


def test_t1_goal_is_1_3x_the_peer_capped_by_the_bound_and_never_below_the_peer():
    assert targets.t1_goal(100.0, 500.0) == (pytest.approx(130.0), "1.3 x peer")
    assert targets.t1_goal(100.0, None)[0] == pytest.approx(130.0)
    goal, why = targets.t1_goal(100.0, 120.0)  # 1.3 x peer > bound; 0.9 x bound = 108 > peer
    assert goal == pytest.approx(108.0) and "bound" in why
    assert targets.t1_goal(100.0, 105.0)[0] == pytest.approx(100.0)  # 0.9 x bound < peer: the peer


def test_t1_and_t2_verdicts_against_the_best_peer():
    results = {
        "levels": [
            _lv("triton", 1, 90.0, p50=11.0),
            _lv("ray", 1, 80.0, p50=20.0),
            _lv("mlserver", 1, 85.0, p50=10.0),
            _lv("triton", 16, 300.0, p99=40.0),
            _lv("ray", 16, 200.0, p99=45.0),
            _lv("litserve", 16, 220.0, p99=30.0),
            _lv("triton", 64, 310.0, p99=90.0),
            _lv("ray", 64, 100.0, p99=200.0),
            _lv("ray", 16, 999.0, variant="openvino int8"),  # no Triton level for this variant
        ]
    }
    t1 = {t.name: t for t in targets.t1(results, lambda m, v: 1000.0)}
    assert set(t1) == {
        "T1 default openvino fp32 at 16 clients",
        "T1 default openvino fp32 at 64 clients",
        "T1 default openvino int8 at 16 clients",
    }
    at16 = t1["T1 default openvino fp32 at 16 clients"]  # 300 >= 1.3 x 220 = 286, but p99 40 > litserve's 30
    assert at16.met is False and "litserve" in at16.detail and "286.0" in at16.detail
    assert t1["T1 default openvino fp32 at 64 clients"].met is True
    assert (
        t1["T1 default openvino int8 at 16 clients"].met is None
        and "not measured" in t1["T1 default openvino int8 at 16 clients"].line()
    )
    results["levels"][3]["other_cpu"], results["levels"][5]["other_cpu"] = 0.4, 0.02  # a busy machine under Triton
    assert "others' CPU 40% during Triton, 2% during litserve" in targets.t1(results, lambda m, v: 1000.0)[0].detail
    capped = targets.t1(results, lambda m, v: 250.0)  # 1.3 x 220 > 250: goal max(0.9 x 250, 220) = 225
    assert "goal 225.0/s" in capped[0].detail
    (t2,) = [t for t in targets.t2(results) if "fp32" in t.name]
    assert t2.met is True and "mlserver" in t2.detail  # 11 <= 1.2 x 10 (MLServer's p50, the lowest)
    results["levels"][0]["p50_ms"] = 12.5
    assert [t for t in targets.t2(results) if "fp32" in t.name][0].met is False


def test_chosen_variants_are_the_builds_fp32_pick_and_the_best_bound():
    results = {
        "variants": {"m onnxruntime fp32": {"auto_choice": False}, "m openvino fp32": {"auto_choice": True}},
        "inprocess": [
            dict(model="m", variant="openvino int8", captions_per_s=200.0),
            dict(model="m", variant="openvino fp32", captions_per_s=100.0),
        ],
    }
    labels = ["onnxruntime fp32", "openvino fp32", "openvino int8"]
    assert chosen_variants(results, "m", labels, "auto") == ["openvino fp32", "openvino int8"]
    assert chosen_variants(results, "m", labels, "fp32") == ["openvino fp32"]
    assert chosen_variants(results, "m", labels, "onnxruntime:fp32") == ["onnxruntime fp32"]
    # A best variant only 1.6x the fp32 bound (the default model's int8) is not worth a peer run.
    results["inprocess"][0]["captions_per_s"] = 160.0
    assert chosen_variants(results, "m", labels, "auto") == ["openvino fp32"]


def test_side_by_side_table_and_plot(tmp_path):
    results = {
        "cores": 2,
        "inprocess": [dict(model="default", variant="openvino fp32", batch_size=32, captions_per_s=400.0, cpu=0.5)],
        "levels": [_lv("triton", 16, 300.0), _lv("ray", 16, 200.0), _lv("naive", 16, 20.0, variant="torch fp32")],
        "peer_setup": {"ray": {"setup_s": 101.0, "version": "ray[serve]==2.60.0"}},
    }
    table = peers_report.side_by_side(results)
    assert "| default | openvino fp32 | 16 | Ray Serve | 200.0 | 10.0 | 50.0 | 8.00 | 7.5 | 900 | 600 |" in table
    assert "in-process bound (batch 32) | 400.0" in table and "naive" in table and "| 9.0 |" in table
    assert "made in 101 s" in peers_report.setup_lines(results)
    (png,) = peers_report.plots(results, tmp_path)
    assert png.name == "bench_peers_default.png" and png.read_bytes()[:4] == b"\x89PNG"


def test_cli_peer_flags():
    a = parse_args(["--peers", "ray,mlserver", "--peer-concurrency", "1,64"])
    assert a.peers == ["ray", "mlserver"] and a.peer_concurrency == [1, 64] and a.peer_batch_wait_ms is None
    assert parse_args(["--peers", "none"]).peers == []
    with pytest.raises(SystemExit):
        parse_args(["--peers", "torchserve"])


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
def test_peak_memory_sees_this_process():
    import os

    from bench.procmem import PeakMemory

    with PeakMemory([os.getpid()], interval=0.05) as mem:
        peaks = mem.peaks()
    assert peaks["peak_rss_mib"] > 10 and (peaks["peak_pss_mib"] is None or 0 < peaks["peak_pss_mib"] <= peaks["peak_rss_mib"])


def test_the_project_root_is_what_the_peers_import_from():
    assert (Path(venv.ROOT) / "captioner" / "serving" / "preprocess.py").is_file()
