"""An encoder graph that takes the prepared uint8 image, [batch, S, S, 3] HWC as Pillow
gives it, and normalises inside the graph: Cast, /255, -mean, /std, NHWC -> NCHW, the
same float32 operations in the same order as `captioner.preprocess.normalize`, so under
onnxruntime the encoder sees bit-identical input (OpenVINO folds the normalisation into
the first convolution: equal within float rounding, ~1e-5 relative). The preprocess model then hands the encoder a quarter
of the bytes (uint8 instead of float32) through shared memory, and on a GPU the
normalisation runs there. Works on any encoder graph with one NCHW float input `image`,
the QDQ int8 graph included."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from captioner.preprocess import PreprocessConfig

from .export import ENCODER_INPUTS

INPUT = ENCODER_INPUTS[0]


def with_uint8_input(src: str | Path, dst: str | Path, cfg: PreprocessConfig) -> Path:
    model = onnx.load(str(src))
    graph = model.graph
    (inp,) = [i for i in graph.input if i.name == INPUT]
    if inp.type.tensor_type.elem_type != TensorProto.FLOAT:
        raise ValueError(f"{src}: input {INPUT} is not float32 (already uint8?)")
    inner = f"{INPUT}_normalised"
    for node in graph.node:
        node.input[:] = [inner if x == INPUT else x for x in node.input]
    s = cfg.image_size
    consts = {
        "u8_scale": np.array(255.0, np.float32),
        "u8_mean": np.asarray(cfg.mean, np.float32),
        "u8_std": np.asarray(cfg.std, np.float32),
    }
    graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in consts.items())
    nodes = [
        helper.make_node("Cast", [INPUT], ["u8_float"], to=TensorProto.FLOAT, name="u8_cast"),
        helper.make_node("Div", ["u8_float", "u8_scale"], ["u8_unit"], name="u8_div255"),
        helper.make_node("Sub", ["u8_unit", "u8_mean"], ["u8_centred"], name="u8_sub_mean"),
        helper.make_node("Div", ["u8_centred", "u8_std"], ["u8_scaled"], name="u8_div_std"),
        helper.make_node("Transpose", ["u8_scaled"], [inner], perm=[0, 3, 1, 2], name="u8_nhwc_to_nchw"),
    ]
    for n in reversed(nodes):
        graph.node.insert(0, n)
    batch = inp.type.tensor_type.shape.dim[0]
    new = helper.make_tensor_value_info(INPUT, TensorProto.UINT8, [batch.dim_param or batch.dim_value or "batch", s, s, 3])
    graph.input.remove(inp)
    graph.input.insert(0, new)
    del graph.value_info[:]
    onnx.checker.check_model(model, full_check=True)
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(dst))
    return dst
