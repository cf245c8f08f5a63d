"""launcher.rollout without a server: its command line, and refusals that leave the
repository as it was (tests/integration/test_rollout.py runs the real thing)."""

from __future__ import annotations

import json

import pytest
from serving_support import tiny_checkpoint

from builder import versions
from builder.export import export_decoder_step, export_encoder
from builder.repository import assemble
from captioner import checkpoint
from launcher import rollout as ro
from launcher.tritonserver import free_port


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    d = tmp_path_factory.mktemp("rollout")
    ck = checkpoint.load(tiny_checkpoint(d / "ck"))
    art = {"encoder_onnx": export_encoder(ck, d / "e.onnx"), "decoder_onnx": export_decoder_step(ck, d / "d.onnx")}
    return assemble(ck, d / "repo", "cpu", art)


def test_rollout_needs_a_model_and_keep_at_least_one(capsys):
    with pytest.raises(SystemExit):
        ro.parse_args(["rollout"])
    assert "rollout needs --model" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        ro.parse_args(["rollback", "--keep", "0"])
    a = ro.parse_args(["rollout", "--model", "runs/x", "--build-arg=--runtime=onnxruntime", "--restricted-key", "k=v"])
    assert (a.model, a.build_arg, a.restricted_key) == ("runs/x", ["--runtime=onnxruntime"], "k=v")


def test_no_server_is_refused_before_anything_is_built(repo, capsys):
    before = sorted(p.name for p in repo.rglob("*"))
    rc = ro.main(["rollout", "--model", "nowhere", "--repo", str(repo), "--url", f"127.0.0.1:{free_port()}"])
    assert rc == ro.EXIT_REFUSED
    err = capsys.readouterr().err
    assert "rollout REFUSED, serving unchanged: cannot reach the server's model-repository API" in err
    assert sorted(p.name for p in repo.rglob("*") if p.name != ro.LOCK) == before


def test_rollback_goes_to_the_version_served_before_else_the_highest_older_one(repo, tmp_path):
    import shutil

    r = tmp_path / "r"
    shutil.copytree(repo, r)
    for v in (2, 3):
        for m in versions.models(r) + ["captioner"]:
            shutil.copytree(r / m / "1", r / m / str(v))
    assert ro._previous(r, 3) == 2
    (r / versions.MANIFEST).write_text(json.dumps({"previous": 1}))
    assert ro._previous(r, 3) == 1
    with pytest.raises(ro.RolloutRefused, match="no version before 1"):
        ro._previous(r, 1)


def test_the_switch_ends_only_when_a_fresh_request_gets_the_new_version(monkeypatch):
    answers = iter(["1:old", "1:old", "2:new"])
    monkeypatch.setattr(ro, "served_label", lambda server, png: next(answers))
    ro.await_label(ro.Server(), "2:new", timeout_s=5.0)  # the third answer names it
    monkeypatch.setattr(ro, "served_label", lambda server, png: "1:old")
    with pytest.raises(ro.RolloutFailed, match="still answers as 1:old"):
        ro.await_label(ro.Server(), "2:new", timeout_s=0.2)
