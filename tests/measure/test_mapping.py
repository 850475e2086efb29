"""mapping: ONNX layers back to torch parameters, by values, for both exporters."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from onnxlrf.models import ModelSpec, load_model

from onnxlrf.export import export_model
from onnxlrf.graph.layers import find_layers, weight_array
from onnxlrf.measure.mapping import ParamMatch, map_parameters
from onnxlrf.onnx_io import load_onnx


def _export(spec: ModelSpec, path: Path, dynamo: bool) -> onnx.ModelProto:
    export_model(spec, path, dynamo=dynamo, check=False)
    return load_onnx(path)


def _assert_reconstructs(module: torch.nn.Module, model: onnx.ModelProto, matches: dict[str, ParamMatch]) -> None:
    params = dict(module.named_parameters())
    for layer in find_layers(model)[0]:
        if layer.node in matches:
            match = matches[layer.node]
            torch_weight = params[match.qualified_name].detach().numpy()
            np.testing.assert_allclose(match.reconstruct(torch_weight), weight_array(model, layer), rtol=1e-5,
                                       atol=1e-7, err_msg=layer.node)


def _bn_scale(bn: torch.nn.BatchNorm2d) -> np.ndarray:
    return (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach().double().numpy()


@pytest.fixture(scope="module")
def resnet20(resnet20_weights: Path) -> ModelSpec:
    return load_model("cifar10-resnet20", weights=str(resnet20_weights))


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_resnet20_every_conv_and_fc(resnet20: ModelSpec, tmp_path: Path, dynamo: bool) -> None:
    model = _export(resnet20, tmp_path / "r20.onnx", dynamo)
    layers, _ = find_layers(model)
    matches = map_parameters(resnet20.module, model)
    convs = {name for name, m in resnet20.module.named_modules() if isinstance(m, torch.nn.Conv2d)}
    assert len(layers) == 20 and set(matches) == {layer.node for layer in layers}
    assert {m.module_name for m in matches.values()} == convs | {"linear"}
    modules = dict(resnet20.module.named_modules())
    for match in matches.values():
        assert match.param_name == "weight" and not match.transposed
        if match.module_name == "linear":
            assert match.exact and match.channel_scale is None
            continue
        # Both exporters fold the BatchNorm that follows each conv (conv1 -> bn1, ...).
        assert not match.exact
        bn = modules[match.module_name.replace("conv", "bn")]
        np.testing.assert_allclose(match.channel_scale, _bn_scale(bn), rtol=1e-5)
    _assert_reconstructs(resnet20.module, model, matches)


def test_torchvision_resnet18(tmp_path: Path) -> None:
    spec = load_model("torchvision:resnet18")
    generator = torch.Generator().manual_seed(0)
    for bn in (m for m in spec.module.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        # Random statistics, so that folding is visible (fresh BatchNorms fold to a scale of ~1).
        bn.running_var.uniform_(0.5, 2.0, generator=generator)
        bn.weight.data.uniform_(-1.0, 1.0, generator=generator)
    model = _export(spec, tmp_path / "r18.onnx", dynamo=False)
    layers, _ = find_layers(model)
    matches = map_parameters(spec.module, model)
    convs = {name for name, m in spec.module.named_modules() if isinstance(m, torch.nn.Conv2d)}
    assert len(convs) == 20 and set(matches) == {layer.node for layer in layers}
    assert {m.module_name for m in matches.values()} == convs | {"fc"}
    modules = dict(spec.module.named_modules())
    for match in matches.values():
        if match.module_name != "fc":
            bn_name = match.module_name.replace("conv", "bn").replace("downsample.0", "downsample.1")
            np.testing.assert_allclose(match.channel_scale, _bn_scale(modules[bn_name]), rtol=1e-5)
    _assert_reconstructs(spec.module, model, matches)


@pytest.fixture(scope="module")
def minilm() -> ModelSpec:
    return load_model("minilm")


def _check_minilm(minilm: ModelSpec, tmp_path: Path, dynamo: bool) -> None:
    model = _export(minilm, tmp_path / "minilm.onnx", dynamo)
    matches = map_parameters(minilm.module, model)
    encoder_linears = {
        name for name, m in minilm.module.named_modules()
        if isinstance(m, torch.nn.Linear) and name.startswith("encoder.encoder.layer.")
    }
    assert len(encoder_linears) == 36
    assert len(matches) == 36 and {m.module_name for m in matches.values()} == encoder_linears
    assert all(m.transposed and m.exact and m.param_name == "weight" for m in matches.values())
    _assert_reconstructs(minilm.module, model, matches)


def test_minilm_torchscript(minilm: ModelSpec, tmp_path: Path) -> None:
    _check_minilm(minilm, tmp_path, dynamo=False)


def test_minilm_dynamo(minilm: ModelSpec, tmp_path: Path) -> None:
    _check_minilm(minilm, tmp_path, dynamo=True)


class _TwoLinears(torch.nn.Module):
    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.first = torch.nn.Linear(4, 3, bias=False)
        self.second = torch.nn.Linear(4, 3, bias=False)
        with torch.no_grad():
            self.first.weight.copy_(weight)
            self.second.weight.copy_(weight)


def _matmul_graph(weights: dict[str, np.ndarray]) -> onnx.ModelProto:
    """One MatMul ``x @ w`` per (node name, (in, out) weight), each its own graph output."""
    nodes, inits, outputs = [], [], []
    for i, (name, w) in enumerate(weights.items()):
        inits.append(numpy_helper.from_array(w.astype(np.float32), f"w{i}"))
        nodes.append(helper.make_node("MatMul", ["x", f"w{i}"], [f"y{i}"], name=name))
        outputs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [2, w.shape[1]]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                              outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_identical_weights_resolved_by_name_and_unmatched_absent() -> None:
    weight = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    module = _TwoLinears(weight)
    unrelated = np.random.default_rng(0).standard_normal((4, 3))
    model = _matmul_graph({
        "/second/MatMul": weight.numpy().T, "/first/MatMul": weight.numpy().T, "/other/MatMul": unrelated,
    })
    matches = map_parameters(module, model)
    assert {node: m.module_name for node, m in matches.items()} == {
        "/second/MatMul": "second", "/first/MatMul": "first"
    }


def test_negative_and_zero_channel_scales() -> None:
    conv = torch.nn.Conv2d(2, 3, 3, bias=False)
    with torch.no_grad():
        conv.weight[1] = 0.0
    scale = np.array([-2.0, 7.0, 0.25])
    folded = (scale[:, None, None, None] * conv.weight.detach().double().numpy()).astype(np.float32)
    folded[1] = 0.0
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="/conv/Conv")
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 5, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 3, 3])],
        [numpy_helper.from_array(folded, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    match = map_parameters(conv, model)["/conv/Conv"]
    assert (match.module_name, match.param_name, match.exact, match.transposed) == ("", "weight", False, False)
    np.testing.assert_allclose(match.channel_scale[[0, 2]], scale[[0, 2]], rtol=1e-6)
    np.testing.assert_allclose(match.reconstruct(conv.weight.detach().numpy()), folded, atol=1e-7)
