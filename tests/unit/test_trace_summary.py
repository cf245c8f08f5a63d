"""bench.trace_summary reads Triton-mode trace files (the layout tritonserver 2.51 writes:
one entry naming the model and its parent, one entry per timestamp) and says where a
request's time went per ensemble step; launcher.tracing turns --trace-* into Triton flags."""

from __future__ import annotations

import json

import pytest

from bench import trace_summary as ts
from launcher import tracing
from launcher.cli import parse_args

MS = 1_000_000


def _entries(trace_id: int, model: str, parent: int | None, stamps: dict[str, float]) -> list[dict]:
    head: dict = {"id": trace_id, "model_name": model, "model_version": 1}
    if parent is not None:
        head["parent_id"] = parent
    return [head] + [{"id": trace_id, "timestamps": [{"name": k, "ns": int(v * MS)}]} for k, v in stamps.items()]


def _step(start: float, queue: float, inp: float, infer: float, out: float) -> dict[str, float]:
    s = {"REQUEST_START": start, "QUEUE_START": start + 0.01}
    s["COMPUTE_START"] = s["QUEUE_START"] + queue
    s["COMPUTE_INPUT_END"] = s["COMPUTE_START"] + inp
    s["COMPUTE_OUTPUT_START"] = s["COMPUTE_INPUT_END"] + infer
    s["COMPUTE_END"] = s["COMPUTE_OUTPUT_START"] + out
    s["REQUEST_END"] = s["COMPUTE_END"] + 0.01
    return s


def _request(root: int, start: float, pre_queue: float, gen_queue: float) -> list[dict]:
    pre = _step(start + 0.1, pre_queue, 0.1, 4.0, 0.2)
    gen = _step(pre["REQUEST_END"] - 0.05, gen_queue, 0.05, 2.5, 0.3)  # begins as preprocess releases
    call = _step(gen["COMPUTE_INPUT_END"] + 0.2, 0.02, 0.01, 0.5, 0.01)  # one BLS call of the generator
    end = gen["REQUEST_END"] + 0.2
    return (
        _entries(root + 2, "caption_generator", root, gen)
        + _entries(root + 3, "decoder_step", root + 2, call)
        + _entries(root + 1, "preprocess", root, pre)
        + _entries(root, "captioner", None, {"REQUEST_START": start, "QUEUE_START": start + 0.02, "REQUEST_END": end})
    )


@pytest.fixture
def trace_file(tmp_path):
    base = tmp_path / "trace.json"
    # two parts, as with --trace-log-frequency: a quick request and one that queued long
    (tmp_path / "trace.json.0").write_text(json.dumps(_request(1, 1000.0, 0.1, 0.2)))
    (tmp_path / "trace.json.1").write_text(json.dumps(_request(5, 2000.0, 480.0, 150.0)))
    return base


def test_the_slowest_request_is_broken_down_per_step_and_phase(trace_file, capsys):
    assert ts.main([str(trace_file)]) == 0
    out = capsys.readouterr().out
    assert "2 traced requests" in out
    slow = out[out.index("request 5 (captioner)") :]
    assert "request 1 (captioner)" not in slow  # only the slowest is described
    rows = {
        line.split()[0]: line.split()
        for line in slow.splitlines()
        if line.strip().startswith(("preprocess", "caption_generator"))
    }
    # starts at, queue, input, infer, output, total
    assert [float(x) for x in rows["preprocess"][1:7]] == pytest.approx([0.1, 480.0, 0.1, 4.0, 0.2, 484.32], abs=0.06)
    assert [float(x) for x in rows["caption_generator"][2:6]] == pytest.approx([150.0, 0.05, 2.5, 0.3], abs=0.06)
    assert "+ decoder_step" in slow


def test_steps_add_up_to_the_request_and_overlap_is_not_counted_twice(trace_file):
    traces = ts.load(ts.trace_files(trace_file))
    (slow,) = [r for r in ts.requests(traces) if r.id == 5]
    assert [c.model for c in slow.children] == ["preprocess", "caption_generator"]
    covered = ts.covered_ms(slow)
    assert covered < sum(c.total_ms for c in slow.children)  # the two steps overlap by 0.05 ms
    assert 0 <= slow.total_ms - covered == pytest.approx(0.1 + 0.2, abs=0.01)


def test_a_request_can_be_chosen_by_trace_id(trace_file, capsys):
    assert ts.main([str(trace_file), "--request", "1"]) == 0
    assert "request 1 (captioner)" in capsys.readouterr().out
    assert ts.main([str(trace_file), "--request", "99"]) == 1


def test_bad_input_gets_a_clear_error(tmp_path, capsys):
    assert ts.main([str(tmp_path / "none.json")]) == 2
    assert "--trace-rate" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text('{"not": "a list"}')
    assert ts.main([str(tmp_path / "bad.json")]) == 2
    assert "not a Triton trace file" in capsys.readouterr().err
    (tmp_path / "other.json").write_text(json.dumps(_entries(1, "encoder", None, {"REQUEST_START": 1, "REQUEST_END": 2})))
    assert ts.main([str(tmp_path / "other.json")]) == 1
    assert "no complete captioner request" in capsys.readouterr().err


def test_tracing_flags_for_triton_and_opentelemetry_modes(tmp_path):
    assert tracing.server_args(0, tmp_path / "t.json") == ()
    triton = tracing.server_args(10, tmp_path / "sub" / "t.json", log_frequency=5)
    assert "--trace-config=rate=10" in triton and "--trace-config=level=TIMESTAMPS" in triton
    assert f"--trace-config=triton,file={tmp_path / 'sub' / 't.json'}" in triton and (tmp_path / "sub").is_dir()
    assert "--trace-config=triton,log-frequency=5" in triton
    otel = tracing.server_args(1, None, "http://127.0.0.1:4318/v1/traces")
    assert "--trace-config=mode=opentelemetry" in otel
    assert "--trace-config=opentelemetry,url=http://127.0.0.1:4318/v1/traces" in otel
    assert not any("triton,file" in x for x in otel)
    with pytest.raises(ValueError):
        tracing.server_args(-1, tmp_path / "t.json")


def test_the_launcher_takes_the_trace_flags(monkeypatch):
    for var in ("CAPTIONER_TRACE_RATE", "CAPTIONER_TRACE_OTLP", "CAPTIONER_TRACE_FILE"):
        monkeypatch.delenv(var, raising=False)
    a = parse_args(["--trace-rate", "100"])
    assert a.trace_rate == 100 and a.trace_file.endswith(".json") and a.trace_otlp is None
    assert parse_args([]).trace_rate == 0  # off unless asked for
    with pytest.raises(SystemExit):
        parse_args(["--trace-rate", "-1"])
