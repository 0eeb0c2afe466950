"""Static check that an ONNX graph stays inside what TensorRT's ONNX parser builds.

TensorRT cannot be installed everywhere, so exported graphs are checked against the operator
list of the TensorRT 10 ONNX parser (``onnx-tensorrt/docs/operators.md``) and against the
properties a fast engine needs: every convolution has constant weights (no per-sample grouped
convolution), no QR or other linear-algebra ops, a static shape for every axis but the batch.
"""

from __future__ import annotations

from pathlib import Path

#: Operators of the TensorRT 10 ONNX parser that the EDTalk graphs may use (a subset of the full list).
TRT_SUPPORTED_OPS = frozenset({
    "Abs", "Add", "ArgMax", "AveragePool", "BatchNormalization", "Cast", "Ceil", "Clip", "Concat", "Constant",
    "ConstantOfShape", "Conv", "ConvTranspose", "Cos", "Div", "Einsum", "Equal", "Erf", "Exp", "Expand",
    "Flatten", "Floor", "Gather", "GatherElements", "Gemm", "GlobalAveragePool", "Greater", "GridSample",
    "Identity", "InstanceNormalization", "LeakyRelu", "Less", "Log", "MatMul", "Max", "Min", "Mul", "Neg", "Not",
    "Pad", "Pow", "Range", "Reciprocal", "ReduceMax", "ReduceMean", "ReduceMin", "ReduceSum", "Relu", "Reshape",
    "Resize", "Shape", "Sigmoid", "Sin", "Slice", "Softmax", "Split", "Sqrt", "Squeeze", "Sub", "Tanh",
    "Transpose", "Unsqueeze", "Where",
})

#: Operators that must never appear (slow or unsupported in TensorRT, or a sign of a per-frame QR).
FORBIDDEN_OPS = frozenset({"Loop", "If", "Scan", "SequenceConstruct", "NonZero", "Unique"})

#: ONNX data types TensorRT accepts for network inputs/outputs.
TRT_IO_TYPES = {1: "float32", 10: "float16", 6: "int32", 7: "int64", 9: "bool", 2: "uint8", 16: "bfloat16"}


def check_graph(path: str | Path) -> list[str]:
    """Return the list of problems that would stop or slow a TensorRT build (empty when the graph is fine)."""
    import onnx

    model = onnx.load(str(path))
    graph = model.graph
    problems: list[str] = []
    constants = {i.name for i in graph.initializer}
    constants |= {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if not 13 <= opset <= 21:
        problems.append(f"opset {opset} outside the range TensorRT 10 parses (13..21)")
    for node in graph.node:
        op = node.op_type
        if node.domain not in ("", "ai.onnx"):
            problems.append(f"node {node.name or op}: custom domain '{node.domain}'")
        elif op in FORBIDDEN_OPS:
            problems.append(f"node {node.name or op}: operator {op} is not allowed")
        elif op not in TRT_SUPPORTED_OPS:
            problems.append(f"node {node.name or op}: operator {op} is not in the TensorRT ONNX parser's list")
        if op in ("Conv", "ConvTranspose"):
            if len(node.input) < 2 or node.input[1] not in constants:
                problems.append(f"node {node.name or op}: {op} with non-constant weights (per-sample convolution)")
        if op == "GridSample":
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            mode = attrs.get("mode", b"bilinear")
            if (mode.decode() if isinstance(mode, bytes) else mode) not in ("bilinear", "linear", "nearest"):
                problems.append(f"node {node.name or op}: GridSample mode {mode!r} unsupported")
    for value in [*graph.input, *graph.output]:
        tt = value.type.tensor_type
        if tt.elem_type not in TRT_IO_TYPES:
            problems.append(f"tensor {value.name}: data type {tt.elem_type} not accepted by TensorRT")
        dims = tt.shape.dim
        if not dims:
            problems.append(f"tensor {value.name}: no shape")
            continue
        for i, d in enumerate(dims):
            static = d.HasField("dim_value") and d.dim_value > 0
            if i == 0 and static:
                problems.append(f"tensor {value.name}: batch axis is static ({d.dim_value}), expected dynamic")
            if i > 0 and not static:
                problems.append(f"tensor {value.name}: axis {i} is dynamic, only the batch axis may be")
    return problems
