"""Load shedding: queue policies derived from measured rates (builder/capacity.py), written
into the repository's configs, and the launcher's hardening flags (launcher/cli.py)."""

from __future__ import annotations

import pytest
from google.protobuf import text_format
from serving_support import tiny_checkpoint
from tritonclient.grpc import model_config_pb2 as mc

from builder import capacity
from builder.capacity import Capacity, QueuePolicy, policies
from builder.export import export_decoder_step, export_encoder
from builder.repository import assemble
from captioner import checkpoint
from launcher import cli as serve

SEED_LIKE = Capacity(
    preprocess_per_s=200.0, encoder_per_s=30.0, decode_per_s=400.0, pipeline_per_s=24.0, encoder_batch=32, threads=2, cores=2
)
SMALL = Capacity(1500.0, 1200.0, 2000.0, 900.0, 32, 2, 2)


def test_queues_hold_half_a_budget_of_the_stacks_rate_and_heavy_batches_are_capped():
    q = policies(SEED_LIKE, max_batch=32, budget_ms=1000)
    assert q["encoder"].batch_cap == 3  # 3 images at 30/s run in 0.1 s: an eighth of the budget
    # 24 captions/s x 0.25 s = 6 waiting
    assert q["preprocess"] == QueuePolicy(max_queue_size=6, timeout_us=1_000_000)
    assert q["encoder"] == QueuePolicy(6, 1_000_000, 3)
    assert q["caption_generator"].max_queue_size == 6
    assert "decoder_step" not in q  # mid-caption steps are never refused


def test_fast_models_get_deep_queues_and_no_batch_cap():
    q = policies(SMALL, max_batch=32, budget_ms=1000)
    assert q["preprocess"].max_queue_size == q["encoder"].max_queue_size == 225  # 900/s x 0.25 s
    assert q["encoder"].batch_cap == 0


def test_in_the_fused_layout_preprocess_admits_as_the_encoder_does():
    q = policies(SEED_LIKE, max_batch=32, budget_ms=1000, fused=True)
    assert q["preprocess"] == q["encoder"] and q["preprocess"].batch_cap == 3


def test_the_build_log_names_only_models_the_repository_holds():
    fused = capacity.describe(policies(SEED_LIKE, max_batch=32, fused=True), fused=True)
    assert [line.split(":")[0] for line in fused] == ["preprocess (runs the encoder)", "caption_generator"]
    assert "batches capped at 3" in fused[0]
    split = capacity.describe(policies(SEED_LIKE, max_batch=32))
    assert [line.split(":")[0] for line in split] == ["preprocess", "encoder", "caption_generator"]


def test_overrides_and_the_unmeasured_default():
    assert policies(None, 32)["encoder"] == QueuePolicy(128, 1_000_000, 0)  # four batches
    assert policies(SEED_LIKE, 32, max_queue_size=9)["preprocess"].max_queue_size == 9
    off = policies(SEED_LIKE, 32, max_queue_size=0)
    assert all(p == QueuePolicy() for p in off.values())  # shedding off: the old behaviour


def test_measure_reports_positive_rates_for_a_real_checkpoint(tmp_path):
    ck = checkpoint.load(tiny_checkpoint(tmp_path / "ck"))
    enc, dec = export_encoder(ck, tmp_path / "enc.onnx"), export_decoder_step(ck, tmp_path / "dec.onnx")
    c = capacity.measure(ck, enc, dec, batch=4, min_seconds=0.05)
    assert min(c.preprocess_per_s, c.encoder_per_s, c.decode_per_s) > 0 and c.encoder_batch == 4
    # the ceiling of three stages sharing the cores is below the sum of each on its own
    assert c.pipeline_per_s < c.cores * min(c.preprocess_per_s, c.decode_per_s)


def test_the_repository_carries_the_policies(tmp_path):
    ck = checkpoint.load(tiny_checkpoint(tmp_path / "ck"))
    art = {"encoder_onnx": export_encoder(ck, tmp_path / "e.onnx"), "decoder_onnx": export_decoder_step(ck, tmp_path / "d.onnx")}
    q = policies(SEED_LIKE, max_batch=32, budget_ms=400)  # cap: 30/s x 0.05 s = 1
    repo = assemble(ck, tmp_path / "repo", "cpu", art, queues=q)
    cfg = {p.parent.name: text_format.Parse(p.read_text(), mc.ModelConfig()) for p in repo.glob("*/config.pbtxt")}
    for name in ("preprocess", "encoder", "caption_generator"):
        policy = cfg[name].dynamic_batching.default_queue_policy
        assert policy.max_queue_size == q[name].max_queue_size
        assert policy.default_timeout_microseconds == 400_000
        assert policy.timeout_action == mc.ModelQueuePolicy.REJECT and policy.allow_timeout_override
    assert list(cfg["encoder"].dynamic_batching.preferred_batch_size) == [q["encoder"].batch_cap]
    assert not cfg["decoder_step"].dynamic_batching.HasField("default_queue_policy")


# --- the launcher's flags -----------------------------------------------------------------


def test_restricted_key_protects_everything_but_inference_and_health(tmp_path):
    a = serve.parse_args(["--restricted-key", "admin-key=s3cret", "--no-build"])
    args = serve.server_args(a)
    grpc = next(x for x in args if x.startswith("--grpc-restricted-protocol="))
    http = next(x for x in args if x.startswith("--http-restricted-api="))
    for flag in (grpc, http):
        groups, key = flag.split("=", 1)[1].split(":")
        assert key == "admin-key=s3cret"
        assert set(groups.split(",")) == {"model-repository", "model-config", "shared-memory", "statistics", "trace", "logging"}
        assert "inference" not in groups and "health" not in groups
    assert serve.control_headers(a) == {"admin-key": "s3cret"}


def test_tls_flags(tmp_path):
    cert, key, ca = (tmp_path / n for n in ("c.pem", "k.pem", "ca.pem"))
    for f in (cert, key, ca):
        f.write_text("pem")
    a = serve.parse_args(["--grpc-ssl-cert", str(cert), "--grpc-ssl-key", str(key)])
    assert serve.server_args(a) == ("--grpc-use-ssl=true", f"--grpc-server-cert={cert}", f"--grpc-server-key={key}")
    a = serve.parse_args(["--grpc-ssl-cert", str(cert), "--grpc-ssl-key", str(key), "--grpc-ssl-root-cert", str(ca)])
    assert "--grpc-use-ssl-mutual=true" in serve.server_args(a) and f"--grpc-root-cert={ca}" in serve.server_args(a)
    for bad in (
        ["--grpc-ssl-cert", str(cert)],
        ["--grpc-ssl-root-cert", str(ca)],
        ["--grpc-ssl-cert", str(tmp_path / "missing.pem"), "--grpc-ssl-key", str(key)],
        ["--restricted-key", "novalue"],
        ["--replicas", "0"],
    ):
        with pytest.raises(SystemExit):
            serve.parse_args(bad)


def test_environment_defaults(monkeypatch):
    monkeypatch.setenv("CAPTIONER_DRAIN_TIMEOUT", "45")
    monkeypatch.setenv("CAPTIONER_SUPERVISE", "false")
    monkeypatch.setenv("CAPTIONER_REPLICAS", "3")
    a = serve.parse_args([])
    assert (a.drain_timeout, a.supervise, a.replicas) == (45, False, 3)


def test_replicas_get_distinct_ports_and_logs():
    assert serve.replica_log("logs/tritonserver.log", 0) == "logs/tritonserver.log"
    assert serve.replica_log("logs/tritonserver.log", 2) == "logs/tritonserver-2.log"
    assert serve.REPLICA_PORT_STEP >= 3  # http, grpc and metrics of replica k never meet replica k+1's


def test_serve_resolves_model_names_as_the_build_does(monkeypatch, tmp_path):
    from builder import seed_inception

    made = tmp_path / "seed"
    made.mkdir()
    (made / checkpoint.FILENAME).write_bytes(b"x")
    monkeypatch.setattr(seed_inception, "ensure", lambda *a, **k: made)
    assert serve.resolve_checkpoint("seed-inception") == made / checkpoint.FILENAME
    with pytest.raises(FileNotFoundError, match="seed-inception"):
        serve.resolve_checkpoint(str(tmp_path / "nothing-here"))
