"""int8 text towers: onnxruntime's dynamic quantisation, with one activation scale per row instead of per tensor.

``quantize(source, dest)`` writes the int8 model of the float32 export at ``source``: its MatMuls with constant
weights quantised by ``onnxruntime.quantization.quantize_dynamic`` (int8 weights, one scale per output channel),
then each ``DynamicQuantizeLinear`` (which scales a whole activation tensor by its largest value) replaced by a
quantisation with one scale per row of its last axis: per token, for a text tower.

Why per row (measured, bench/RESULTS.md "int8 text towers"):
- **Batch mates.** One scale per tensor is set by the batch's largest activation, padding included, so a text's int8
  features changed with the texts batched beside it (up to 0.36 in MiniLM's token states): the server, which batches
  requests together, gave 6-12 labels in 1,280 other than ``predict`` on the same rows. Per row, a text's features
  are the same alone or in any batch (the integer products are exact).
- **Outliers.** A few tokens with large activations coarsen every other token's steps. mpnet's int8 features agreed
  with float32 at a cosine of 0.866 per tensor (refused); per row, 0.995. MiniLM's token states: 0.967 to 0.994.

The rewrite keeps the quantiser's graph but for the scales. onnxruntime fuses ``MatMulInteger -> Cast -> Mul`` into
one kernel, ``MatMulIntegerToFloat``, which reads the activation scale as a single number: a per-row scale inside
that ``Mul`` gave cosines of 0.54. So the rewrite writes that kernel itself with an activation scale of 1, and
multiplies its output by the row scale after it. The cost against one scale per tensor (MiniLM's token states, 32
texts, 2 cores): 53 to 67 ms a batch, for the quantisation's extra passes and the bias no longer fused.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

SCHEME = "per-row activation scales, symmetric uint8 around 128, MatMulIntegerToFloat"
"""Recorded with an int8 export (and in an int8 tower's fingerprint): an export or cached features made another way
are made again."""


def quantize(source: Path, dest: Path) -> None:
    """Writes to ``dest`` the int8 model of the float32 ONNX model at ``source`` (see the module's docstring)."""
    import onnx  # deferred, as onnxruntime: the optional extra mmfuse[cpu]
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(
        source,
        dest,
        weight_type=QuantType.QInt8,
        per_channel=True,  # per tensor lost 0.03 of cosine on MiniLM's token states
        op_types_to_quantize=["MatMul", "Gemm"],
        extra_options={"MatMulConstBOnly": True},  # the attention's activation products stay float32
    )
    model = per_row(onnx.load(dest))
    onnx.save(model, dest)


def per_row(model):
    """``model`` (an onnx ModelProto from ``quantize_dynamic``) with each activation quantised per row of its last
    axis: scale = max |x| / 127 over the row, q = round(x / scale) + 128 as uint8, zero point 128.

    Raises:
        ValueError: the graph is not the shape ``quantize_dynamic`` makes (an activation scale used otherwise than
            as ``Mul(scale, weight scale)`` feeding ``Mul``s), or its opset is older than 13.
    """
    from onnx import helper, numpy_helper

    graph = model.graph
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if opset < 13:  # QuantizeLinear with one scale per row (per-axis) needs opset 13
        raise ValueError(f"int8 per row needs ONNX opset 13 or newer; this export has {opset}")
    quantizers = [n for n in graph.node if n.op_type == "DynamicQuantizeLinear"]
    row_scale = {n.output[1]: f"{n.name}_row_scale" for n in quantizers}
    users: dict[str, list] = {}
    for n in graph.node:
        for name in n.input:
            users.setdefault(name, []).append(n)
    # Mul(tensor scale, weight scale) -> the MatMul output's scale; that output's Mul is then followed by the row's
    after: dict[str, str] = {}
    for scale, row in row_scale.items():
        for mul in users.get(scale, []):
            if mul.op_type != "Mul" or any(u.op_type != "Mul" for u in users.get(mul.output[0], [])):
                raise ValueError(f"an activation scale ({scale}) is used by {mul.op_type}, not the quantiser's Mul")
            after[mul.output[0]] = row

    constants = {
        "int8row_axis": np.array([-1], np.int64),
        "int8row_eps": np.array(1e-8, np.float32),  # an all-zero row: any scale gives zeros
        "int8row_127": np.array(127.0, np.float32),
        "int8row_one": np.array(1.0, np.float32),
        "int8row_zero_point": np.array(128, np.uint8),
    }
    producer = {out: n for n in graph.node for out in n.output}
    # The Muls that scale a MatMul's output, by output name -> the scale product they read
    scaled = {n.output[0]: i for n in graph.node if n.op_type == "Mul" for i in n.input if i in after}
    chains = {}  # such a Mul's output -> the MatMulInteger and Cast before it, which one fused kernel replaces
    for n in graph.node:
        if n.output and n.output[0] in scaled:
            chain = _matmul_chain(n, scaled[n.output[0]], producer, users)
            if chain is not None:
                chains[n.output[0]] = (scaled[n.output[0]], *chain)
    # By output name: protobuf hands out new wrappers on each pass over the nodes.
    fused = {node.output[0] for product, matmul, cast, _ in chains.values() for node in (matmul, cast)}
    fused |= {product for product, *_ in chains.values()}
    nodes = []
    for n in graph.node:
        if n.output and n.output[0] in fused:
            continue
        if n.op_type == "DynamicQuantizeLinear":
            nodes += _row_quantizer(n, row_scale[n.output[1]], opset, helper, numpy_helper)
            continue
        if not n.output or n.output[0] not in scaled:
            nodes.append(n)
            continue
        out, before = n.output[0], f"{n.output[0]}_before_row_scale"
        if out in chains:  # MatMulInteger -> Cast -> Mul, written as the kernel onnxruntime fuses them to
            _, matmul, _, weight_scale = chains[out]
            a, b, a_zero, b_zero = matmul.input
            fused_kernel = helper.make_node(
                "MatMulIntegerToFloat",
                [a, b, "int8row_one", weight_scale, a_zero, b_zero],
                [before],
                domain="com.microsoft",
                name=f"{matmul.name}_to_float",
            )
            nodes.append(fused_kernel)
        else:  # the MatMul output times its (now weight-only) scale, then times the row scale
            n.output[0] = before
            nodes.append(n)
        nodes.append(helper.make_node("Mul", [before, after[scaled[out]]], [out], name=f"{n.name}_row_scale"))
    if fused and not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in constants.items())
    return model


def _matmul_chain(mul, product: str, producer: dict, users: dict):
    """(MatMulInteger, Cast, weight scale) where ``mul`` is ``Mul(Cast(MatMulInteger(...)), product)`` with
    ``product`` = ``Mul(activation scale, weight scale)`` and nothing else reading the MatMul's or the Cast's output;
    None otherwise."""
    other = next((name for name in mul.input if name != product), None)
    cast = producer.get(other)
    matmul = producer.get(cast.input[0]) if cast is not None and cast.op_type == "Cast" else None
    scales = producer.get(product)
    if matmul is None or matmul.op_type != "MatMulInteger" or len(matmul.input) != 4 or scales is None:
        return None
    if users.get(cast.output[0]) != [mul] or users.get(matmul.output[0]) != [cast] or users.get(product) != [mul]:
        return None
    weight_scale = [name for name in scales.input if name not in producer]  # the initializer, not the quantiser's
    return (matmul, cast, weight_scale[0]) if len(weight_scale) == 1 else None


def _row_quantizer(node, scale: str, opset: int, helper, numpy_helper) -> list:
    """The nodes that replace one ``DynamicQuantizeLinear``: the same three outputs, its scale output now 1 (the row
    scale, ``scale``, is applied after the MatMul) and its zero point 128."""
    x, (quantized, tensor_scale, zero_point) = node.input[0], node.output
    p = f"{node.name}_row"
    if opset >= 18:  # the reduction's axes became an input in opset 18
        reduce = helper.make_node("ReduceMax", [f"{p}_abs", "int8row_axis"], [f"{p}_max"], keepdims=1, name=f"{p}_max")
    else:
        reduce = helper.make_node("ReduceMax", [f"{p}_abs"], [f"{p}_max"], axes=[-1], keepdims=1, name=f"{p}_max")
    fill = numpy_helper.from_array(np.array([128], np.uint8))
    return [
        helper.make_node("Abs", [x], [f"{p}_abs"], name=f"{p}_abs"),
        reduce,
        helper.make_node("Max", [f"{p}_max", "int8row_eps"], [f"{p}_max_eps"], name=f"{p}_max_eps"),
        helper.make_node("Div", [f"{p}_max_eps", "int8row_127"], [scale], name=f"{p}_scale"),
        # QuantizeLinear takes one scale per index of one axis: rows flattened to [rows, width], scales to [rows]
        helper.make_node("Reshape", [scale, "int8row_axis"], [f"{p}_scales"], name=f"{p}_scales"),
        helper.make_node("Shape", [f"{p}_scales"], [f"{p}_rows"], name=f"{p}_rows"),
        helper.make_node("ConstantOfShape", [f"{p}_rows"], [f"{p}_points"], value=fill, name=f"{p}_points"),
        helper.make_node("Flatten", [x], [f"{p}_flat"], axis=-1, name=f"{p}_flat"),
        helper.make_node(
            "QuantizeLinear", [f"{p}_flat", f"{p}_scales", f"{p}_points"], [f"{p}_q"], axis=0, name=f"{p}_q"
        ),
        helper.make_node("Shape", [x], [f"{p}_shape"], name=f"{p}_shape"),
        helper.make_node("Reshape", [f"{p}_q", f"{p}_shape"], [quantized], name=f"{p}_quantized"),
        helper.make_node("Identity", ["int8row_zero_point"], [zero_point], name=f"{p}_zero_point"),
        helper.make_node("Identity", ["int8row_one"], [tensor_scale], name=f"{p}_unit"),
    ]
