"""int8 with one activation scale per row (models.towers.int8): on a small graph built here, the quantised MatMul
gives per-row quantisation's numbers, a row's answer does not depend on the rows beside it (as it did with one scale
per tensor), and a graph the rewrite does not know is refused rather than rewritten wrongly."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import QuantType, quantize_dynamic

from mmfuse.models.towers import int8

WIDTH, OUT = 16, 8


def linear_model(path, weight):
    """y = x @ W + b over x of shape [batch, tokens, WIDTH], opset 20, as torch's exporter writes a Linear."""
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["xw"]),
            helper.make_node("Add", ["xw", "b"], ["y"]),
        ],
        "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "tokens", WIDTH])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "tokens", OUT])],
        [numpy_helper.from_array(weight, "W"), numpy_helper.from_array(np.linspace(-1, 1, OUT, dtype=np.float32), "b")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]), path)


def session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])  # every graph optimisation on


@pytest.fixture
def models(tmp_path):
    weight = np.random.default_rng(0).normal(0, 0.5, (WIDTH, OUT)).astype(np.float32)
    linear_model(tmp_path / "fp32.onnx", weight)
    int8.quantize(tmp_path / "fp32.onnx", tmp_path / "row.onnx")
    quantize_dynamic(tmp_path / "fp32.onnx", tmp_path / "tensor.onnx", weight_type=QuantType.QInt8, per_channel=True)
    return tmp_path, weight


def rows():
    rng = np.random.default_rng(1)
    x = rng.normal(0, 1, (2, 3, WIDTH)).astype(np.float32)
    x[1, 2] *= 50  # a row of outliers beside the others
    return x


def test_the_quantised_matmul_is_per_row_quantisation(models):
    path, weight = models
    x = rows()
    got = session(path / "row.onnx").run(None, {"x": x})[0]
    # The same arithmetic in numpy: each row scaled by its max |x| / 127, weights per output channel.
    scale = np.abs(x).max(-1, keepdims=True) / 127
    q = np.clip(np.round(x / scale), -127, 127)
    w_scale = np.abs(weight).max(0) / 127
    wq = np.round(weight / w_scale)
    expected = (q @ wq) * scale * w_scale + np.linspace(-1, 1, OUT, dtype=np.float32)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    exact = x @ weight + np.linspace(-1, 1, OUT, dtype=np.float32)
    assert np.abs(got - exact).max() < 0.05 * np.abs(exact).max()
    ops = {n.op_type for n in onnx.load(path / "row.onnx").graph.node}
    assert "MatMulIntegerToFloat" in ops and not ops & {"DynamicQuantizeLinear", "MatMulInteger"}  # one fused kernel


def test_a_row_gives_the_same_answer_whatever_rows_are_beside_it(models):
    path, _ = models
    x = rows()
    for name, same in (("row.onnx", True), ("tensor.onnx", False)):  # one scale per tensor: the outlier row moves it
        run = session(path / name)
        alone = run.run(None, {"x": x[:1, :2]})[0]
        beside = run.run(None, {"x": x})[0][:1, :2]
        assert np.array_equal(alone, beside) is same, name


def test_a_graph_the_rewrite_does_not_know_is_refused(models):
    path, _ = models
    model = onnx.load(path / "tensor.onnx")
    scale = next(n for n in model.graph.node if n.op_type == "DynamicQuantizeLinear").output[1]
    model.graph.node.append(helper.make_node("Add", [scale, scale], ["stray"]))
    with pytest.raises(ValueError, match="activation scale .* is used by Add"):
        int8.per_row(model)
    old = onnx.load(path / "tensor.onnx")
    old.opset_import[0].version = 12
    with pytest.raises(ValueError, match="opset 13 or newer"):
        int8.per_row(old)
