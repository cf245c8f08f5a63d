"""OpenVINO repositories served by the real tritonserver caption exactly what the
in-process reference of the same variant (same graphs, same runtime, same precision;
bench.inprocess) captions: fp32 in the split layout with uint8 encoder input, and the
int8 QDQ graph in the fused layout (decode + encoder in one Python model). Bad input
is still refused per request in the fused layout, and the shipped model's captions stay
correct by the scene spec."""

from __future__ import annotations

import pytest
from conftest import default_checkpoint
from triton_requests import ask_all

from bench.inprocess import InProcessCaptioner
from builder.export import export_decoder_step, export_encoder
from builder.quantize import calibration_images, quantize_int8
from builder.repository import assemble, check_repository
from builder.runtime_choice import warm_cache
from builder.uint8_input import with_uint8_input
from captioner.scenes import caption_is_correct, encoded_scenes
from captioner.serving import runtime as rt
from launcher.tritonserver import TritonServer

pytestmark = [pytest.mark.integration, pytest.mark.skipif(rt.openvino_version() is None, reason="openvino is not installed")]
N_SCENES = 64


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    work = tmp_path_factory.mktemp("openvino")
    ck, shipped = default_checkpoint(work / "checkpoint")
    enc = export_encoder(ck, work / "encoder.onnx")
    int8 = quantize_int8(enc, work / "encoder.int8.onnx", calibration_images(ck, 32))
    return (
        work,
        shipped,
        ck,
        {
            "fp32": with_uint8_input(enc, work / "encoder.uint8.onnx", ck.preprocess),
            "int8": with_uint8_input(int8, work / "encoder.int8.uint8.onnx", ck.preprocess),
        },
        export_decoder_step(ck, work / "decoder_step.onnx"),
    )


@pytest.mark.parametrize("precision,layout", [("fp32", "split"), ("int8", "fused")])
def test_openvino_repository_captions_equal_the_inprocess_reference(graphs, precision, layout):
    work, shipped, ck, encoders, dec = graphs
    repo = assemble(
        ck,
        work / f"repo-{precision}-{layout}",
        "cpu",
        {"encoder_onnx": encoders[precision], "decoder_onnx": dec},
        precision=precision,
        runtimes={"encoder": "openvino"},
        encoder_input="uint8",
        layout=layout,
    )
    configs = check_repository(repo)
    assert ("encoder" in configs) == (layout == "split")
    warmed = warm_cache(repo)
    assert warmed == ["encoder" if layout == "split" else "preprocess"]
    drawn = encoded_scenes(N_SCENES, 4242)
    images = [data for data, _ in drawn]
    reference = InProcessCaptioner(ck, encoders[precision], dec, threads=1, runtime="openvino").caption_bytes(images)
    with TritonServer(repo, log_file=work / f"tritonserver-{precision}-{layout}.log") as server:
        answers = ask_all(server.grpc_url, [(d, None) for d in images] + [(b"not an image", None)])
    served, bad = answers[:-1], answers[-1]
    mismatches = [(i, a.caption, r) for i, (a, r) in enumerate(zip(served, reference)) if a.caption != r]
    assert not mismatches, f"{len(mismatches)} of {N_SCENES} differ, e.g. {mismatches[:3]}"
    assert bad.status == "StatusCode.INVALID_ARGUMENT" and "not a decodable image" in bad.message
    log = (work / f"tritonserver-{precision}-{layout}.log").read_text()
    assert "Traceback" not in log
    if shipped:  # the shipped model's accuracy does not drop with OpenVINO (the spec's rule, as for onnxruntime)
        correct = sum(caption_is_correct(a.caption, sc) for a, (_, sc) in zip(served, drawn))
        assert correct / N_SCENES >= 0.98, f"{correct}/{N_SCENES} correct"
