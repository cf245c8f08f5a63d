"""builder.repository: configs generated from the checkpoint, complete, and refused when not."""

import shutil

import pytest
from google.protobuf import text_format
from serving_support import tiny_checkpoint
from tritonclient.grpc import model_config_pb2 as mc

from builder.export import export_decoder_step, export_encoder
from builder.repository import RepositoryError, assemble, check_repository, recorded_checkpoint
from captioner import checkpoint

PY_MODELS = ("preprocess", "encoder", "decoder_step", "caption_generator")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    d = tmp_path_factory.mktemp("repo")
    ck = checkpoint.load(tiny_checkpoint(d / "ck"))
    art = {"encoder_onnx": export_encoder(ck, d / "enc.onnx"), "decoder_onnx": export_decoder_step(ck, d / "dec.onnx")}
    plan = d / "encoder.plan"
    plan.write_bytes(b"engine bytes")
    return ck, art, plan, d


def _configs(repo):
    return {p.parent.name: text_format.Parse(p.read_text(), mc.ModelConfig()) for p in repo.glob("*/config.pbtxt")}


def test_cpu_repository_takes_every_value_from_the_checkpoint(built, tmp_path):
    ck, art, _, _ = built
    repo = assemble(ck, tmp_path / "repo", "cpu", art, max_batch_size=24)
    cfg = _configs(repo)
    assert set(cfg) == {"captioner", *PY_MODELS}
    s, u, v = ck.preprocess.image_size, ck.args.lstm_units, len(ck.vocab)
    assert s == 32 and u == 24  # the tiny checkpoint's own values, not the shipped model's
    assert list(cfg["preprocess"].output[0].dims) == [3, s, s]
    assert list(cfg["encoder"].input[0].dims) == [3, s, s]
    assert [list(t.dims) for t in cfg["encoder"].output] == [[u], [u]]
    assert [list(t.dims) for t in cfg["decoder_step"].output] == [[v], [u], [u]]
    assert cfg["caption_generator"].parameters["max_length"].string_value == str(ck.args.max_length)
    assert cfg["caption_generator"].parameters["length_penalty"].string_value == "0.7"
    for name in PY_MODELS:
        assert cfg[name].backend == "python"
        assert cfg[name].HasField("dynamic_batching")
        assert cfg[name].instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU
    assert cfg["captioner"].max_batch_size == 24 and cfg["decoder_step"].max_batch_size == 240
    assert [t.name for t in cfg["captioner"].input] == ["IMAGE"]
    assert [(t.name, t.data_type, list(t.dims)) for t in cfg["captioner"].output] == [
        ("CAPTION", mc.TYPE_STRING, [1]),
        ("SCORE", mc.TYPE_FP32, [1]),
        ("MODEL_VERSION", mc.TYPE_STRING, [1]),
    ]
    # every step pinned to one version of its model, and Triton told to load exactly that one
    assert [s.model_version for s in cfg["captioner"].ensemble_scheduling.step] == [1, 1, 1]
    assert all(list(c.version_policy.specific.versions) == [1] for c in cfg.values())
    assert cfg["caption_generator"].parameters["checkpoint_sha256"].string_value == ck.sha256
    assert (repo / "caption_generator" / "1" / "decoder_step.onnx").is_file()
    assert recorded_checkpoint(repo) == ck.sha256


def test_gpu_repository_serves_tensorrt_and_onnxruntime_backends(built, tmp_path):
    ck, art, plan, _ = built
    repo = assemble(ck, tmp_path / "repo", "gpu", {**art, "encoder_plan": plan}, precision="int8")
    cfg = _configs(repo)
    gpu = mc.ModelInstanceGroup.KIND_GPU
    assert (cfg["encoder"].platform, cfg["encoder"].instance_group[0].kind) == ("tensorrt_plan", gpu)
    assert (repo / "encoder" / "1" / "model.plan").read_bytes() == b"engine bytes"
    assert (cfg["decoder_step"].platform, cfg["decoder_step"].instance_group[0].kind) == ("onnxruntime_onnx", gpu)
    assert list(cfg["decoder_step"].input[0].dims) == [1] and cfg["decoder_step"].input[0].HasField("reshape")
    assert cfg["caption_generator"].parameters["step_mode"].string_value == "bls"
    assert not (repo / "caption_generator" / "1" / "decoder_step.onnx").exists()
    assert cfg["captioner"].parameters["precision"].string_value == "int8"


def test_build_parameters_reach_the_configs(built, tmp_path):
    ck, art, _, _ = built
    repo = assemble(
        ck,
        tmp_path / "repo",
        "cpu",
        art,
        instance_counts={"preprocess": 2, "caption_generator": 3},
        ort_threads={"encoder": 2},
        step_mode="bls",
        queue_delay_us=250,
        max_image_bytes=1234,
    )
    cfg = _configs(repo)
    assert cfg["preprocess"].instance_group[0].count == 2 and cfg["caption_generator"].instance_group[0].count == 3
    assert cfg["encoder"].parameters["intra_op_threads"].string_value == "2"
    assert cfg["caption_generator"].parameters["step_mode"].string_value == "bls"
    assert cfg["preprocess"].dynamic_batching.max_queue_delay_microseconds == 250
    assert cfg["preprocess"].parameters["max_image_bytes"].string_value == "1234"


def test_other_files_in_the_repository_directory_are_kept(built, tmp_path):
    ck, art, _, _ = built
    (tmp_path / "repo").mkdir()
    (tmp_path / "repo" / "README.md").write_text("hello")
    assemble(ck, tmp_path / "repo", "cpu", art)
    assemble(ck, tmp_path / "repo", "cpu", art)  # rebuilding replaces the models in place
    assert (tmp_path / "repo" / "README.md").read_text() == "hello"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"target": "tpu"}, "target must be one of"),
        ({"precision": "int4"}, "precision must be one of"),
        ({"max_batch_size": 8}, "max_batch_size must be >= 16"),
        ({"instance_counts": {"encodr": 2}}, "unknown model names"),
        ({"step_mode": "rpc"}, "step_mode must be"),
    ],
)
def test_bad_build_arguments_are_refused(built, tmp_path, kwargs, message):
    ck, art, _, _ = built
    args = {"target": "cpu", **kwargs}
    with pytest.raises(ValueError, match=message):
        assemble(ck, tmp_path / "repo", artifacts=art, **args)


def test_gpu_without_an_engine_is_refused(built, tmp_path):
    ck, art, _, _ = built
    with pytest.raises(RepositoryError, match="encoder_plan"):
        assemble(ck, tmp_path / "repo", "gpu", art)


def test_graphs_that_do_not_match_the_checkpoint_are_refused(built, tmp_path):
    ck, art, _, _ = built
    swapped = {"encoder_onnx": art["decoder_onnx"], "decoder_onnx": art["encoder_onnx"]}
    with pytest.raises(RepositoryError, match="graph inputs"):
        assemble(ck, tmp_path / "repo", "cpu", swapped)
    assert not (tmp_path / "repo" / "encoder").exists()


def _break(repo, name, edit):
    path = repo / name / "config.pbtxt"
    cfg = text_format.Parse(path.read_text(), mc.ModelConfig())
    edit(cfg)
    path.write_text(text_format.MessageToString(cfg))


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda r: (r / "encoder" / "1" / "model.onnx").unlink(), "missing"),
        (lambda r: (r / "caption_generator" / "1" / "vocab.json").unlink(), "vocab.json"),
        (lambda r: shutil.rmtree(r / "decoder_step"), "decoder_step/config.pbtxt"),
        (lambda r: _break(r, "encoder", lambda c: c.output[0].ClearField("dims")), "tensor h0 has dims []"),
        (lambda r: _break(r, "encoder", lambda c: c.output[0].dims.__setitem__(0, 7)), "encoded_h0"),
        (lambda r: _break(r, "preprocess", lambda c: c.ClearField("dynamic_batching")), "no dynamic batching"),
        (
            lambda r: _break(r, "preprocess", lambda c: c.parameters["max_length"].__setattr__("string_value", "{max}")),
            "max_length",
        ),
        (lambda r: _break(r, "captioner", lambda c: c.ensemble_scheduling.step[2].input_map.pop("c0")), "ensemble feeds"),
        (lambda r: _break(r, "captioner", lambda c: setattr(c, "max_batch_size", 4)), "max_batch_size 4 < 16"),
    ],
)
def test_check_repository_finds_incomplete_or_inconsistent_repositories(built, tmp_path, damage, message):
    ck, art, _, _ = built
    repo = assemble(ck, tmp_path / "repo", "cpu", art)
    check_repository(repo)
    damage(repo)
    with pytest.raises(RepositoryError, match=message.replace("[", r"\[").replace("]", r"\]").replace("{", r"\{")):
        check_repository(repo)


def test_models_are_warmed_before_they_report_ready(built, tmp_path):
    """Triton sends the warmup requests at load and after every supervised reload: the
    preprocess one is a real encoded scene (Triton's length-prefixed BYTES layout)."""
    import io
    import struct

    from PIL import Image

    ck, art, _, _ = built
    repo = assemble(ck, tmp_path / "repo", "cpu", art, max_batch_size=24)
    cfg = _configs(repo)
    assert [w.batch_size for w in cfg["encoder"].model_warmup] == [1, 24]
    assert all(i.zero_data for w in cfg["encoder"].model_warmup for i in w.inputs.values())
    assert [w.batch_size for w in cfg["caption_generator"].model_warmup] == [1]
    (w,) = cfg["preprocess"].model_warmup
    data = (repo / "preprocess" / "warmup" / w.inputs["IMAGE"].input_data_file).read_bytes()
    (n,) = struct.unpack("<I", data[:4])
    assert n == len(data) - 4
    assert Image.open(io.BytesIO(data[4:])).size == (128, 128)
    (repo / "preprocess" / "warmup" / w.inputs["IMAGE"].input_data_file).unlink()
    with pytest.raises(RepositoryError, match="warmup"):
        check_repository(repo)
