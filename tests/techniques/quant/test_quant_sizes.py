"""techniques.quant.sizes: logical weight bits over all layer weights, and bytes on disk."""

from __future__ import annotations

import onnx
import pytest
from quant_fixtures import matmul_model, residual_cnn

from onnxlrf.onnx_io import save_onnx
from onnxlrf.techniques.quant.planners import QuantOptions, plan_uniform_quant
from onnxlrf.techniques.quant.sizes import average_weight_bits, file_bytes
from onnxlrf.techniques.quant.technique import QUANT

ELEMENTS = {"conv1": 8 * 3 * 9, "conv2": 8 * 8 * 9, "fc": 4 * 8}


def test_average_weight_bits_counts_float_layers_as_32():
    model = residual_cnn()
    plan = plan_uniform_quant(model, QuantOptions(bits=3))
    assert average_weight_bits(model, plan) == 3.0
    fc = plan.layers[2]
    fc.bits = fc.granularity = fc.container = fc.weight_scales = fc.rounding = None
    total = sum(ELEMENTS.values())
    assert average_weight_bits(model, plan) == pytest.approx((3 * (total - ELEMENTS["fc"]) + 32 * ELEMENTS["fc"])
                                                             / total)


def test_file_bytes_counts_containers_and_external_data(tmp_path):
    model = matmul_model(rows=256, cols=64)
    quantized = {bits: QUANT.rewrite(model, plan_uniform_quant(model, QuantOptions(bits=bits)))[0]
                 for bits in (5, 4, 3)}
    sizes = {name: file_bytes(save_onnx(m, tmp_path / f"{name}.onnx"))
             for name, m in (("float", model), *quantized.items())}
    # 5 bits live in int8 containers: smaller than float, larger than packed int4, which 3 bits fill alike
    # (onnxruntime's form: two levels per byte and one 512-byte table to unpack them).
    assert sizes["float"] > sizes[5] > sizes[4] == sizes[3]
    assert sizes[5] - sizes[4] > 256 * 64 // 2 - 1024
    external = tmp_path / "external.onnx"
    onnx.save(model, str(external), save_as_external_data=True, all_tensors_to_one_file=True, location="w.data",
              size_threshold=0)
    assert file_bytes(external) == external.stat().st_size + (tmp_path / "w.data").stat().st_size
