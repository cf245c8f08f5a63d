"""python -m captioner eval: COCO caption metrics, share correct, robustness variants."""

import json
import time

import pytest

from captioner import evaluate as ev
from captioner.__main__ import main as cli_main
from captioner.data import CocoCaptions
from captioner.inference import Captioner
from captioner.preprocess import decode_image
from captioner.scenes import Scene, caption_is_correct

JAVA = ev.java_status() is None


def test_eval_on_a_trained_model(memorised_run, shapes_data, tmp_path, capsys):
    out = tmp_path / "eval.json"
    ann = shapes_data / "memo_val.json"
    rc = cli_main(
        [
            "eval",
            "--model",
            str(memorised_run),
            "--ann",
            str(ann),
            "--robustness",
            "--out",
            str(out),
            "--batch-size",
            "5",
            "--no-progress",
        ]
        + ([] if JAVA else ["--no-meteor"])
    )
    assert rc == 0
    report = json.loads(out.read_text())
    table = capsys.readouterr().out
    assert report["images"] == 16 and report["model_sha256"] and report["decoding"]["beam_size"] == 1

    # Share correct is the spec's rule over the same captions in-process inference gives.
    data = CocoCaptions(ann)
    caps = Captioner(memorised_run).caption_images([it.path for it in data.items])
    ok = sum(caption_is_correct(c.text, Scene.from_json(data.scenes[it.image_id])) for c, it in zip(caps, data.items))
    assert report["correct"] == ok and report["share_correct"] == pytest.approx(ok / 16)
    assert len([w for w in report["wrong_examples"] if w["variant"] == "original"]) == 16 - ok

    m = report["metrics"]
    expected = ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr"] + (["METEOR"] if JAVA else [])
    assert sorted(m) == sorted(expected)
    assert all(0.0 <= v <= 1.0 for k, v in m.items() if k != "CIDEr") and 0.0 <= m["CIDEr"] <= 10.0
    assert m["BLEU-1"] >= m["BLEU-2"] >= m["BLEU-3"] >= m["BLEU-4"]
    assert m["BLEU-4"] > 0.4 and m["CIDEr"] > 1.0, "a model that captions its scenes right scores high"
    if JAVA:
        assert report["tokenizer"].startswith("ptb") and 0.2 < m["METEOR"] <= 1.0 and report["skipped"] == {}
    assert set(report["robustness"]) == {"jpeg_q75", "resize_64", "resize_512"}
    assert all(r["total"] == 16 and 0 <= r["correct"] <= 16 for r in report["robustness"].values())
    for needle in ("BLEU-4", "CIDEr", "share correct", "jpeg_q75", "resize_512", str(out)):
        assert needle in table


def test_perfect_and_wrong_captions():
    gts = {
        i: [{"caption": f"a {c} circle"}, {"caption": f"a small {c} circle"}, {"caption": f"one small {c} circle"}]
        for i, c in enumerate(["red", "blue", "green", "black"])
    }
    perfect = {i: [{"caption": refs[1]["caption"]}] for i, refs in gts.items()}
    wrong = {i: [{"caption": "a large yellow square above a purple triangle"}] for i in gts}
    good, skipped, _ = ev.text_metrics(gts, perfect, meteor=False, meteor_timeout=60)
    bad, _, _ = ev.text_metrics(gts, wrong, meteor=False, meteor_timeout=60)
    assert skipped == {"METEOR": "disabled (--no-meteor)"}
    assert good["BLEU-4"] == pytest.approx(1.0, abs=1e-6) and good["ROUGE-L"] == pytest.approx(1.0)
    assert bad["BLEU-4"] < 0.01 and bad["ROUGE-L"] < 0.3 and bad["CIDEr"] < good["CIDEr"]


def test_without_java_metrics_fall_back_and_say_so(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no java here
    assert "no `java` on PATH" in ev.java_status()
    gts = {1: [{"caption": "A red circle."}, {"caption": "a red circle"}]}
    res = {1: [{"caption": "a red circle"}]}
    scores, skipped, tokenizer = ev.text_metrics(gts, res, meteor=True, meteor_timeout=60)
    assert tokenizer.startswith("simple") and "no `java` on PATH" in tokenizer
    assert skipped["METEOR"] == "no `java` on PATH" and "METEOR" not in scores
    assert scores["ROUGE-L"] == pytest.approx(1.0)
    assert ev.simple_tokenize(gts) == {1: ["a red circle", "a red circle"]}


@pytest.mark.skipif(not JAVA, reason="METEOR needs a working java")
def test_meteor_with_java():
    gts = {
        i: [{"caption": "a red circle to the left of a blue square"}, {"caption": "a red circle and a blue square"}]
        for i in range(3)
    }
    same = {i: [{"caption": "A red circle and a blue square."}] for i in range(3)}
    g, r, tok = ev.tokenize_all(gts, same, None, 60)
    assert tok.startswith("ptb") and r[0] == ["a red circle and a blue square"]
    # (test_eval_on_a_trained_model sees METEOR on imperfect captions; a JVM start costs ~5 s)
    assert ev.meteor_score(g, r, timeout=120) > 0.9


def test_a_stuck_meteor_is_killed(monkeypatch):
    killed = []

    class StuckProcess:
        def kill(self):
            killed.append(True)

        def poll(self):
            return 0 if killed else None

    class StuckMeteor:
        def __init__(self):
            import threading

            self.lock = threading.Lock()
            self.meteor_p = StuckProcess()

        def compute_score(self, gts, res):
            self.lock.acquire()
            while not killed:
                time.sleep(0.01)
            raise ValueError("could not convert string to float: ''")  # what the real wrapper does when killed

    import pycocoevalcap.meteor.meteor as meteor_module

    monkeypatch.setattr(meteor_module, "Meteor", StuckMeteor)
    t0 = time.time()
    with pytest.raises(TimeoutError):
        ev.meteor_score({1: ["a"]}, {1: ["a"]}, timeout=0.3)
    assert killed and time.time() - t0 < 5
    monkeypatch.setenv("PATH", "")  # and text_metrics reports a failure as skipped, never raises
    scores, skipped, _ = ev.text_metrics({1: [{"caption": "a"}]}, {1: [{"caption": "a"}]}, True, 0.3)
    assert "METEOR" in skipped and "BLEU-4" in scores


def test_split_without_scenes_and_with_an_unreadable_image(memorised_run, shapes_data, tmp_path):
    raw = json.loads((shapes_data / "memo_val.json").read_text())
    raw.pop("scenes")
    raw["images"] = raw["images"][:5]
    raw["images"][2]["file_name"] = "train/does-not-exist.png"
    raw["annotations"] = [a for a in raw["annotations"] if a["image_id"] in {im["id"] for im in raw["images"]}]
    ann = tmp_path / "captions_coco.json"
    ann.write_text(json.dumps(raw))
    out = tmp_path / "r.json"
    rc = ev.main(
        [
            "--model",
            str(memorised_run),
            "--ann",
            str(ann),
            "--images",
            str(shapes_data),
            "--robustness",
            "--no-meteor",
            "--no-progress",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["images"] == 5 and report["share_correct"] is None
    assert "no ground-truth" in report["skipped"]["share correct"] and "robustness" in report["skipped"]
    assert [u["file"].endswith("does-not-exist.png") for u in report["unreadable"]] == [True]
    assert "BLEU-4" in report["metrics"]


def test_bad_model_or_beam_is_an_error(shapes_data, memorised_run, tmp_path, capsys):
    assert (
        ev.main(["--model", str(tmp_path), "--ann", str(shapes_data / "memo_val.json"), "--out", str(tmp_path / "x.json")]) == 2
    )
    assert (
        ev.main(
            [
                "--model",
                str(memorised_run),
                "--ann",
                str(shapes_data / "memo_val.json"),
                "--beam",
                "11",
                "--out",
                str(tmp_path / "x.json"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "no checkpoint" in err and "beam_size must be in 1..10" in err
    assert not (tmp_path / "x.json").exists()


@pytest.mark.parametrize("variant, size", [("jpeg_q75", (128, 128)), ("resize_64", (64, 64)), ("resize_512", (512, 512))])
def test_variants_are_real_files(shapes_data, variant, size):
    from PIL import Image

    img = Image.open(shapes_data / "test" / "000000.png").convert("RGB")
    data = ev.variant_bytes(img, variant)
    back = decode_image(data)
    assert back.size == size
    assert Image.open(__import__("io").BytesIO(data)).format == ("JPEG" if variant == "jpeg_q75" else "PNG")
    with pytest.raises(ValueError):
        ev.variant_bytes(img, "sepia")
