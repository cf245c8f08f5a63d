"""Triton's own metrics and the captioner counters on the metrics port."""

from __future__ import annotations

import random
import re
import urllib.request

import numpy as np
import pytest
from triton_requests import ask_all, encode

from captioner.inference import Captioner
from captioner.scenes import random_scene, render

pytestmark = pytest.mark.integration
_LINE = re.compile(r"^(?P<name>[a-zA-Z_:][\w:]*)(?:\{(?P<labels>[^}]*)\})?\s+(?P<value>\S+)$")


def scrape(url: str) -> dict[tuple[str, frozenset], float]:
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    out = {}
    for line in text.splitlines():
        m = _LINE.match(line.strip())
        if m and not line.startswith("#"):
            labels = frozenset(re.findall(r'(\w+)="([^"]*)"', m["labels"] or ""))
            out[(m["name"], labels)] = float(m["value"])
    return out


def _get(metrics, name, **labels) -> float:
    want = set(labels.items())
    return sum(v for (n, lab), v in metrics.items() if n == name and want <= set(lab))


def test_counters_follow_captions_tokens_and_rejections(triton_server):
    img = encode(render(random_scene(random.Random(3)), np.random.default_rng(3)), "PNG")
    before = scrape(triton_server.metrics_url)
    answers = ask_all(
        triton_server.grpc_url,
        [(img, None), (b"", None), (img, {"beam_size": 0}), (b"not an image", None)],
        concurrency=1,
    )
    assert answers[0].caption is not None and all(a.caption is None for a in answers[1:])
    after = scrape(triton_server.metrics_url)

    def delta(name, **labels):
        return _get(after, name, **labels) - _get(before, name, **labels)

    (reference,) = Captioner(triton_server.checkpoint).caption_images([img])
    assert reference.text == answers[0].caption
    assert delta("captioner_captions_total") == 1
    assert delta("captioner_tokens_total") == len(reference.tokens)
    assert delta("captioner_rejected_total", reason="empty") == 1
    assert delta("captioner_rejected_total", reason="bad_parameter") == 1
    assert delta("captioner_rejected_total", reason="not_an_image") == 1
    assert delta("captioner_rejected_total", reason="too_large") == 0
    # Triton's own counters, per model
    assert delta("nv_inference_request_success", model="captioner") == 1
    # Triton 2.51 counts a failed ensemble request twice (reason="OTHER"): only its growth is checked.
    assert delta("nv_inference_request_failure", model="captioner") >= 3
    assert delta("nv_inference_request_success", model="caption_generator") == 1
    assert _get(after, "nv_inference_queue_duration_us", model="preprocess") > 0


def test_every_rejection_reason_is_exported_from_the_start(triton_server):
    reasons = {dict(lab).get("reason") for (n, lab) in scrape(triton_server.metrics_url) if n == "captioner_rejected_total"}
    assert {"empty", "not_an_image", "corrupt", "zero_size", "too_many_pixels", "too_large", "bad_parameter"} <= reasons
