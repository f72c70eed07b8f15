#!/usr/bin/env python3
"""Export a quartermaster MLP (safetensors) to ONNX with the same weights, for the benchmark
against onnxruntime-node.

    python3 tools/export_onnx.py MODEL.safetensors OUT.onnx

Input `x` is float32 [batch, inputs] (batch dynamic); output `y` is [batch, outputs].
Each dense layer is one Gemm (transB=1, PyTorch layout) followed by its activation.
"""

import sys

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from export_safetensors import read_safetensors

OPS = {"relu": "Relu", "tanh": "Tanh", "sigmoid": "Sigmoid"}


def export(model_path, out_path):
    t, meta = read_safetensors(model_path)
    if meta.get("arch") != "mlp":
        raise ValueError("only mlp models are exported to ONNX")
    n = 0
    while f"dense.{n}.weight" in t:
        n += 1
    acts = meta["activations"].split(",") if "activations" in meta else ["relu"] * (n - 1) + ["none"]
    nodes, inits = [], []
    current = "x"
    for i in range(n):
        w = t[f"dense.{i}.weight"].astype(np.float32)
        b = t.get(f"dense.{i}.bias", np.zeros(w.shape[0])).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
        out = f"h{i}"
        nodes.append(helper.make_node("Gemm", [current, f"w{i}", f"b{i}"], [out], transB=1))
        act = acts[i].strip()
        if act == "gelu":
            half, sqrt2, one = f"half{i}", f"sqrt2_{i}", f"one{i}"
            inits += [
                numpy_helper.from_array(np.array(0.5, np.float32), half),
                numpy_helper.from_array(np.array(np.sqrt(2.0), np.float32), sqrt2),
                numpy_helper.from_array(np.array(1.0, np.float32), one),
            ]
            nodes += [
                helper.make_node("Div", [out, sqrt2], [f"{out}_d"]),
                helper.make_node("Erf", [f"{out}_d"], [f"{out}_e"]),
                helper.make_node("Add", [f"{out}_e", one], [f"{out}_p"]),
                helper.make_node("Mul", [out, f"{out}_p"], [f"{out}_m"]),
                helper.make_node("Mul", [f"{out}_m", half], [f"{out}_a"]),
            ]
            out = f"{out}_a"
        elif act in OPS:
            nodes.append(helper.make_node(OPS[act], [out], [f"{out}_a"]))
            out = f"{out}_a"
        elif act != "none":
            raise ValueError(f"unsupported activation {act}")
        current = out
    nodes.append(helper.make_node("Identity", [current], ["y"]))
    inputs = t["dense.0.weight"].shape[1]
    outputs = t[f"dense.{n - 1}.weight"].shape[0]
    graph = helper.make_graph(
        nodes,
        "quartermaster_mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", inputs])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", outputs])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, out_path)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    export(sys.argv[1], sys.argv[2])
