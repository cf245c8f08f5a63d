"""`make build-engines` and the decode path: the build runs the fast path's gate, records
it in build_manifest.json, and the repository's preprocess.json says which path is
served: fast when the gate passed, exact when it was refused or not asked for."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from builder import build_engines as be
from builder import decode_gate
from builder import tensorrt_engine as te
from captioner.checkpoint import Checkpoint
from captioner.model import CaptionModel, ModelArgs
from captioner.preprocess import PreprocessConfig
from captioner.vocab import SPECIALS, Vocabulary


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    vocab = Vocabulary(list(SPECIALS) + ["a", "red", "blue", "circle", "square", "above"])
    args = ModelArgs(vocab_size=len(vocab), cnn_channels=(8, 16), cnn_grid=2, max_length=8)
    d = tmp_path_factory.mktemp("tiny_decode")
    Checkpoint(args, PreprocessConfig(32), vocab, CaptionModel(args).eval()).save(d)
    return d


def build(model_dir, tmp_path, monkeypatch, *extra):
    monkeypatch.setattr(te, "cuda_available", lambda: False)
    repo = tmp_path / "repo"
    rc = be.main(
        [
            "--model",
            str(model_dir),
            "--repo",
            str(repo),
            "--out",
            str(tmp_path / "out"),
            "--target",
            "cpu",
            "--parity-scenes",
            "8",
            *extra,
        ]
    )
    manifest = json.loads((repo / be.MANIFEST).read_text())
    served = json.loads((repo / "preprocess" / "1" / "preprocess.json").read_text())
    return rc, manifest, served


def test_the_build_gates_the_fast_path_and_serves_what_it_decided(model_dir, tmp_path, monkeypatch, capsys):
    rc, manifest, served = build(model_dir, tmp_path, monkeypatch)
    log = capsys.readouterr().out
    assert rc == 0, log
    d = manifest["decode"]
    assert d["requested"] == "fast" and d["checkpoint"] == "exact"
    gate = d["gate"]
    assert gate["total"] >= 300 and gate["min_agreement"] == decode_gate.MIN_AGREEMENT
    assert d["served"] == ("fast" if gate["passed"] else "exact")
    assert served["decode"] == manifest["preprocess"]["decode"] == d["served"]
    assert "greedy captions fast == exact decode on" in log


def test_a_refused_fast_path_is_built_as_exact_and_says_so(model_dir, tmp_path, monkeypatch, capsys):
    def pixel_tokens(ck):  # a model that tells every pixel apart: the fast path changes its captions
        return lambda images: [(4 + int(x.astype(np.int64).sum()) % 5,) for x in images]

    monkeypatch.setattr(decode_gate, "torch_tokens", pixel_tokens)
    rc, manifest, served = build(model_dir, tmp_path, monkeypatch)
    log = capsys.readouterr().out
    assert rc == 0, log
    assert manifest["decode"]["gate"]["passed"] is False and manifest["decode"]["served"] == "exact"
    assert served["decode"] == "exact"
    assert "fast decode path is REFUSED: the repository serves the exact path" in log


def test_decode_exact_skips_the_gate(model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(decode_gate, "check", lambda *a, **k: pytest.fail("no gate for --decode exact"))
    rc, manifest, served = build(model_dir, tmp_path, monkeypatch, "--decode", "exact")
    assert rc == 0
    assert manifest["decode"] == {"requested": "exact", "checkpoint": "exact", "served": "exact", "gate": None}
    assert served["decode"] == "exact"


def test_the_decode_flag_defaults_from_the_environment(monkeypatch):
    assert be.parse_args([]).decode == "fast"
    monkeypatch.setenv("CAPTIONER_DECODE", "exact")
    assert be.parse_args([]).decode == "exact"


def test_a_speed_only_build_measures_the_decode_gate_without_refusing(model_dir, tmp_path, monkeypatch, capsys):
    """--decode-min-agreement 0 (the bench's random-weight seed-inception): the gate runs and
    is recorded, its disagreement does not refuse the fast path."""

    def pixel_tokens(ck):
        return lambda images: [(4 + int(x.astype(np.int64).sum()) % 5,) for x in images]

    monkeypatch.setattr(decode_gate, "torch_tokens", pixel_tokens)
    rc, manifest, served = build(model_dir, tmp_path, monkeypatch, "--decode-min-agreement", "0")
    assert rc == 0, capsys.readouterr().out
    gate = manifest["decode"]["gate"]
    assert gate["min_agreement"] == 0 and gate["share"] < decode_gate.MIN_AGREEMENT and gate["passed"] is True
    assert manifest["decode"]["served"] == served["decode"] == "fast"
    monkeypatch.setenv("CAPTIONER_DECODE_MIN_AGREEMENT", "0.5")
    assert be.parse_args([]).decode_min_agreement == 0.5
