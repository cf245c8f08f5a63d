"""builder.versions: a checkpoint with other layer sizes added as the next version of an
existing repository, served only when switched to, every version answering as itself."""

from __future__ import annotations

import json
import random

import fake_pb_utils
import numpy as np
import pytest
import torch
from fake_pb_utils import outputs, request
from serving_support import load_model_py, scene_png, tiny_checkpoint

from builder import build_engines as be
from builder import versions
from builder.export import export_decoder_step, export_encoder
from builder.repository import assemble, check_repository, recorded_checkpoint
from captioner import checkpoint
from captioner.checkpoint import Checkpoint
from captioner.inference import Captioner
from captioner.model import CaptionModel, ModelArgs
from captioner.preprocess import PreprocessConfig
from captioner.scenes import all_captions, random_scene
from captioner.vocab import Vocabulary


def other_checkpoint(directory, seed: int = 1):
    """Layer sizes unlike tiny_checkpoint's (LSTM 32 vs 24, 40 px vs 32) and another vocabulary."""
    rng = random.Random(seed)
    vocab = Vocabulary.build([c for _ in range(100) for c in all_captions(random_scene(rng))], min_count=2)
    args = ModelArgs(
        vocab_size=len(vocab),
        cnn_channels=(8, 8),
        cnn_grid=2,
        image_bottleneck=8,
        lstm_units=32,
        embedding_dim=8,
        logit_bottleneck=8,
        max_length=10,
    )
    torch.manual_seed(seed)
    model = CaptionModel(args).eval()
    return Checkpoint(args, PreprocessConfig(40), vocab, model, decoding={"length_penalty": 0.7}).save(directory)


def artifacts(ck, d):
    return {"encoder_onnx": export_encoder(ck, d / "enc.onnx"), "decoder_onnx": export_decoder_step(ck, d / "dec.onnx")}


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    d = tmp_path_factory.mktemp("versions")
    a = checkpoint.load(tiny_checkpoint(d / "a"))
    b = checkpoint.load(other_checkpoint(d / "b"))
    assert (a.args.lstm_units, a.preprocess.image_size) != (b.args.lstm_units, b.preprocess.image_size)
    return (a, artifacts(a, d / "a")), (b, artifacts(b, d / "b"))


def add(ck, art, repo, tmp_path, keep=3, **kw):
    staged = assemble(ck, versions.staging_dir(repo), "cpu", art, **kw)
    return versions.add_version(staged, repo, keep=keep)


def initialize(pb, repo, name, version):
    """A Triton model of `version` as the Python backend starts it."""
    from google.protobuf import json_format

    cfg = versions.read_config(repo, name)
    model = load_model_py(name, pb).TritonPythonModel()
    model.initialize(
        {
            "model_config": json.dumps(json_format.MessageToDict(cfg, preserving_proto_field_name=True)),
            "model_repository": str(repo / name),
            "model_version": str(version),
            "model_name": name,
            "model_instance_kind": "CPU",
            "model_instance_name": f"{name}_0_0",
            "model_instance_device_id": "0",
        }
    )
    return model


def test_a_new_version_is_added_beside_the_served_one_and_served_only_when_switched(two, tmp_path):
    (a, art_a), (b, art_b) = two
    repo = assemble(a, tmp_path / "repo", "cpu", art_a)
    before = {m: (repo / m / "config.pbtxt").read_text() for m in ("captioner",)}
    assert add(b, art_b, repo, tmp_path) == 2
    for m in ("preprocess", "encoder", "decoder_step", "caption_generator", "captioner"):
        assert versions.on_disk(repo, m) == [1, 2]
    # What Triton loads is unchanged: version 1 everywhere, the ensemble pinned to it.
    assert versions.loaded_versions(repo) == {m: [1] for m in versions.models(repo)}
    assert versions.serving_version(repo) == 1 and (repo / "captioner" / "config.pbtxt").read_text() == before["captioner"]
    assert recorded_checkpoint(repo) == a.sha256
    check_repository(repo)
    # Sizes that differ between the versions became -1; the rest stayed exact.
    enc = versions.read_config(repo, "encoder")
    assert [list(t.dims) for t in enc.output] == [[-1], [-1]]
    assert list(enc.input[0].dims) == [3, -1, -1]  # 32 px vs 40 px
    assert not versions.read_config(repo, "caption_generator").model_warmup  # h0 has no single shape any more
    # Each version keeps its own parameters: the checkpoint it was built from.
    for v, ck in ((1, a), (2, b)):
        params = json.loads((repo / "caption_generator" / str(v) / "parameters.json").read_text())
        assert params["checkpoint_sha256"] == ck.sha256 and params["max_length"] == str(ck.args.max_length)
        assert json.loads((repo / "captioner" / str(v) / "parameters.json").read_text())["checkpoint_sha256"] == ck.sha256

    # Serving version 2 needs it loaded first; then every step is pinned to it.
    with pytest.raises(versions.VersionError, match="load it before serving it"):
        versions.set_serving(repo, 2)
    for m in versions.models(repo):
        versions.set_loaded(repo, m, [1, 2])
    versions.set_serving(repo, 2)
    ens = versions.read_config(repo, "captioner")
    assert [s.model_version for s in ens.ensemble_scheduling.step] == [2, 2, 2]
    # the ensemble keeps its own version: Triton reloads it in the background, with no gap
    assert list(ens.version_policy.specific.versions) == [1] and versions.serving_version(repo) == 2
    assert recorded_checkpoint(repo) == b.sha256
    check_repository(repo)


def test_every_version_answers_with_its_own_graphs_and_names_itself(two, tmp_path):
    (a, art_a), (b, art_b) = two
    repo = assemble(a, tmp_path / "repo", "cpu", art_a, layout="split")
    add(b, art_b, repo, tmp_path, layout="split")

    image = {"IMAGE": np.array([[scene_png(3)]], dtype=object)}
    for v, ck in ((1, a), (2, b)):
        pb = fake_pb_utils.make_module()
        pre, enc, gen = (initialize(pb, repo, m, v) for m in ("preprocess", "encoder", "caption_generator"))
        img = outputs(pre.execute([request(image)])[0])["image"]
        assert img.shape[-1] == ck.preprocess.image_size  # each version decodes at its own size
        h = outputs(enc.execute([request({"image": img})])[0])
        assert h["h0"].shape == (1, ck.args.lstm_units)
        got = outputs(gen.execute([request(h)])[0])
        assert got["MODEL_VERSION"][0, 0].decode() == f"{v}:{ck.sha256[:8]}"
        (want,) = Captioner(ck.path).caption_images([scene_png(3)])
        assert got["CAPTION"][0, 0].decode() == want.text  # the version's own checkpoint, in process
        assert pb.MetricFamily.registry["captioner_captions_total"].value(version=f"{v}:{ck.sha256[:8]}") == 1


def test_old_versions_are_pruned_but_never_a_loaded_one(two, tmp_path):
    (a, art_a), (b, art_b) = two
    repo = assemble(a, tmp_path / "repo", "cpu", art_a)
    for ck, art in ((b, art_b), (a, art_a), (b, art_b)):
        add(ck, art, repo, tmp_path, keep=2)
    # versions 3 and 4 are the newest two; 1 is served and loaded, so it stays; 2 went
    assert versions.all_versions(repo) == [1, 3, 4]
    check_repository(repo)
    # serving 4 (loaded alone): 1 goes too, but not the ensemble's own version directory
    for m in versions.models(repo):
        versions.set_loaded(repo, m, [4])
    versions.set_serving(repo, 4)
    assert versions.prune(repo, keep=2) == [1]
    assert versions.all_versions(repo) == [3, 4] and versions.on_disk(repo, "captioner") == [1, 3, 4]
    check_repository(repo)


def test_a_build_of_another_layout_is_refused_and_leaves_the_repository_as_it_was(two, tmp_path):
    (a, art_a), (b, art_b) = two
    repo = assemble(a, tmp_path / "repo", "cpu", art_a, layout="split")
    snapshot = sorted(str(p.relative_to(repo)) for p in repo.rglob("*"))
    with pytest.raises(versions.VersionError, match="layouts differ"):
        add(b, art_b, repo, tmp_path, layout="fused")
    assert sorted(str(p.relative_to(repo)) for p in repo.rglob("*")) == snapshot
    assert not list(tmp_path.glob(".repo-next-*"))  # no staging left behind


def test_build_engines_add_version_records_each_version_and_its_gate_captions(two, tmp_path, monkeypatch, capsys):
    (a, _), (b, _) = two
    monkeypatch.setattr("builder.tensorrt_engine.cuda_available", lambda: False)
    repo = tmp_path / "repo"
    common = ["--repo", str(repo), "--parity-scenes", "10", "--target", "cpu", "--runtime", "onnxruntime", "--decode", "exact"]
    rc = be.main(["--model", str(b.path), "--out", str(tmp_path / "o0"), "--add-version", *common])
    assert rc == be.EXIT_USAGE and "has none (make build-engines first)" in capsys.readouterr().out
    assert be.main(["--model", str(a.path), "--out", str(tmp_path / "o1"), *common]) == 0
    assert be.main(["--model", str(b.path), "--out", str(tmp_path / "o2"), "--add-version", *common]) == 0
    assert "added as version 2 (2:" in capsys.readouterr().out
    manifest = json.loads((repo / be.MANIFEST).read_text())
    assert manifest["model_version"] == 2 and manifest["checkpoint"]["sha256"] == b.sha256
    records = manifest["model_versions"]
    assert sorted(records) == ["1", "2"]
    assert records["1"]["checkpoint_sha256"] == a.sha256 and records["1"]["source"] == str(a.path)
    assert records["2"]["checkpoint_sha256"] == b.sha256 and records["2"]["model_version"] == f"2:{b.sha256[:8]}"
    gate = records["2"]["gate"]
    # the checkpoint's in-process captions, images decoded as the version's preprocess.json says
    served = versions.served_preprocess(repo, 2)
    assert gate["captions"] == versions.reference_captions(b.path, gate["scenes"], gate["seed"], served)
    assert versions.serving_version(repo) == 1
    check_repository(repo)
