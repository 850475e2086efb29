"""The joint method on a small CNN trained in the test: analysis, planners, back-off, determinism."""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
from test_data import sentence_encoder_model
from test_refit import token_encoder, token_pairs

from onnxlrf.data import Dataset
from onnxlrf.graph.layers import (
    Layer,
    count_params,
    find_layers,
    matrices_to_weight,
    weight_matrices,
)
from onnxlrf.measure.analysis import (
    AnalysisOptions,
    analysis_batch_size,
    calibration_batches,
    joint_analysis,
)
from onnxlrf.measure.sensitivity import (
    _joint_basis,
    _spatial_factors,
    _sqrt_and_inverse,
    _unfold_inputs,
    analyze,
    classification_loss,
    measure_loss,
    measure_ranges,
    replacement_gains,
    similarity_curvature,
    similarity_loss,
)
from onnxlrf.measure import sensitivity as sensitivity_module
from onnxlrf.measure.torch_graph import TorchGraph
from onnxlrf.pipeline import compress_joint
from onnxlrf.planning.joint import PlanOptions
from onnxlrf.planning.plan import Plan
from onnxlrf.techniques.lowrank.planners import baseline_basis, plan_baseline
from onnxlrf.techniques.lowrank.rewrite import apply_plan
from onnxlrf.techniques.lowrank.technique import plan_joint
from onnxlrf.verify.backoff import VerifyOptions
from onnxlrf.verify.splits import SplitOptions, split_dataset

CLASSES = 4


def run_joint(model, data, mode, target_reduction=None, target="params", calib=1000, val=1000, seed=0, labels="labels",
              spatial=None, analysis_cache=None, rounds=1, refit=True, provider="auto", progress=None,
              first_order=False):
    """:func:`compress_joint` with its option objects filled from the CLI's flag names."""
    return compress_joint(model, data, PlanOptions(mode, target_reduction=target_reduction, target=target),
                          SplitOptions(calib, val, seed), AnalysisOptions(labels=labels, spatial=spatial,
                                                                          cache=analysis_cache,
                                                                          first_order=first_order),
                          VerifyOptions(rounds=rounds, refit=refit), provider=provider, progress=progress)


def _data(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Images whose class is a noisy oriented texture: learnable, not trivially separable."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, CLASSES, n)
    yy, xx = np.mgrid[0:12, 0:12]
    patterns = np.stack([np.sin(xx), np.sin(yy), np.sin(xx + yy), np.sin(xx - yy)]).astype(np.float32)
    images = patterns[labels][:, None].repeat(3, axis=1) * rng.uniform(0.2, 1.0, (n, 3, 1, 1))
    images += rng.normal(0, 1.0, images.shape)
    return images.astype(np.float32), labels


@pytest.fixture(scope="module")
def small_cnn(tmp_path_factory) -> tuple[onnx.ModelProto, Dataset]:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 24, 3, padding=1), nn.BatchNorm2d(24), nn.ReLU(),
        nn.Conv2d(24, 32, 3, padding=1, stride=2), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, CLASSES),
    )
    x, y = _data(2000, seed=1)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for epoch in range(4):
        for i in range(0, 2000, 100):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(net(torch.from_numpy(x[i:i + 100])), torch.from_numpy(y[i:i + 100]))
            loss.backward()
            opt.step()
    net.eval()
    path = tmp_path_factory.mktemp("cnn") / "cnn.onnx"
    torch.onnx.export(net, (torch.from_numpy(x[:2]),), str(path), dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["logits"], dynamic_axes={"input": {0: "N"}})
    model = onnx.load(str(path))
    xt, yt = _data(1500, seed=2)
    return model, Dataset("synthetic", "classification", {"input": xt}, yt)


def _batches(dataset: Dataset, batch: int = 100):
    return calibration_batches(dataset, dataset.labels, batch)


def test_torch_graph_matches_onnxruntime(small_cnn):
    model, data = small_cnn
    feeds = {"input": data.inputs["input"][:16]}
    expected = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    got = TorchGraph(model)(feeds)[0].detach().numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def _encoder_pairs(pairs: int = 300, hidden: int = 16, model: onnx.ModelProto | None = None,
                   seq: int = 5) -> tuple[onnx.ModelProto, Dataset]:
    """A small sentence encoder and pairs scored by its own cosines plus noise (residuals about 0.03)."""
    model = model or sentence_encoder_model(hidden=hidden, seq=seq)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 40, (2 * pairs, seq)).astype(np.int64)
    mask = np.ones_like(ids)
    emb = TorchGraph(model)({"input_ids": ids, "attention_mask": mask})[0].detach()
    cos = torch.nn.functional.cosine_similarity(emb[:pairs], emb[pairs:], dim=-1).numpy()
    gold = (5 * (cos + rng.normal(0, 0.03, pairs))).astype(np.float32)
    return model, Dataset("pairs", "sentence-similarity", {"input_ids": ids, "attention_mask": mask}, gold)


def test_similarity_curvature_predicts_a_well_fit_encoder():
    """A well-fit encoder, as trained ones are: the empirical Fisher, scaled by the squared
    residual, sees almost no curvature; the Gauss-Newton factor from ``similarity_curvature`` does."""
    hidden = 16
    model, data = _encoder_pairs(hidden=hidden)
    base = measure_loss(model, _batches(data, 50), similarity_loss)

    def drop(sens, rank: int) -> tuple[float, float]:
        ls = sens.layers["proj"]
        keep = ls.keep(rank)
        weight = matrices_to_weight(ls.reconstruct(keep), ls.layer, "channel").astype(np.float32)
        measured = measure_loss(model, _batches(data, 50), similarity_loss, {ls.layer.weight: weight}) - base
        return measured, float(ls.scores()[0, np.setdiff1d(np.arange(hidden), keep[0])].sum())

    gauss_newton = analyze(model, _batches(data, 50), similarity_loss, curvature_fn=similarity_curvature)
    fisher = analyze(model, _batches(data, 50), similarity_loss)
    assert gauss_newton.layers["proj"].quadratic.sum() > 100 * fisher.layers["proj"].quadratic.sum()
    for rank in (12, 8):
        measured, predicted = drop(gauss_newton, rank)
        assert measured > 0 and abs(measured - predicted) <= 1e-3 + 0.5 * max(measured, abs(predicted)), rank
        measured, predicted = drop(fisher, rank)
        assert measured > 10 * abs(predicted), rank  # the empirical Fisher drops what matters, as free


def test_label_free_similarity_targets_are_the_originals_cosines():
    model, data = _encoder_pairs()
    sens = joint_analysis(model, data, AnalysisOptions(labels="predictions", range_samples=100))
    assert sens.reference_loss < 1e-10
    ls = sens.layers["proj"]
    # Zero gradient at the original: the plan rests on curvature alone, and the range checks see it.
    assert np.abs(ls.first_order).max() < 1e-4 * ls.quadratic.max()
    assert all(check["measured"] > 0 for check in ls.range_checks)


@pytest.mark.parametrize("bias_correction", [True, False])
def test_joint_basis_reconstructs_weight_and_small_drop_is_predicted(small_cnn, bias_correction):
    model, data = small_cnn
    calib = data.subset(np.arange(500))
    sens = analyze(model, _batches(calib), classification_loss, bias_correction=bias_correction, spatial=True)
    assert len(sens.layers) == 5  # three convs, two Linear layers
    # The three 3x3 convs in spatial decomposition too; bias correction is channel-only.
    assert len(sens.spatial) == (0 if bias_correction else 3)
    base = measure_loss(model, _batches(calib), classification_loss)
    assert sens.reference_loss == pytest.approx(base, rel=1e-4)
    checked = 0
    for ls in sens.all():
        k = ls.s.shape[1]
        if ls.layer.groups != 1:
            continue
        full = ls.reconstruct(ls.keep(k))
        weight = matrices_to_weight(full, ls.layer, ls.decomposition)
        original = onnx.numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == ls.layer.weight))
        np.testing.assert_allclose(weight, original, rtol=1e-6, atol=1e-6)
        # Near W the Taylor model must hold: drop the two components whose own weight change
        # s_i * |x_i| * |y_i| is smallest (only the smallest where two change W by over 10%:
        # the 4-output classifier has 4 components), and compare measured with predicted loss change.
        size = ls.s[0] * np.linalg.norm(ls.x[0], axis=0) * np.linalg.norm(ls.y[0], axis=0)
        order = np.argsort(size)
        dropped = order[:2]
        if np.linalg.norm(ls.reconstruct(dropped[None])) > 0.1 * ls.weight_norm:
            dropped = order[:1]
        keep = np.setdiff1d(np.arange(k), dropped)[None]
        weight = matrices_to_weight(ls.reconstruct(keep), ls.layer, ls.decomposition).astype(np.float32)
        shift = ls.output_shift(keep)
        assert (shift is not None) == bias_correction
        measured = measure_loss(model, _batches(calib), classification_loss, {ls.layer.weight: weight},
                                output_shifts={ls.layer.node: shift} if bias_correction else None) - base
        predicted = float(ls.scores()[0, dropped].sum())
        assert abs(measured - predicted) <= 0.005 + 0.5 * abs(measured), (ls.layer.node, ls.decomposition)
        checked += 1
    assert checked >= (2 if bias_correction else 5)


def test_perturbation_dloss_agrees_with_the_basis_and_predicts_a_quantization_error(small_cnn):
    model, data = small_cnn
    calib = data.subset(np.arange(500))
    sens = analyze(model, _batches(calib), classification_loss)
    base = measure_loss(model, _batches(calib), classification_loss)
    for ls in sens.layers.values():
        k = ls.s.shape[1]
        # Removing the whole weight, predicted from G, A and B directly and in the joint basis (whose factors
        # are damped by 1e-3 of their mean diagonal: close, not equal).
        delta = -ls.reconstruct(ls.keep(k))
        assert ls.perturbation_dloss(delta, kappa=2.0) == pytest.approx(ls.predicted_dloss(kappa=2.0)[0],
                                                                        rel=0.02), ls.layer.node
        # A 4-bit rounding error of the whole layer, per output channel, measured.
        weight = onnx.numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == ls.layer.weight))
        matrices = weight_matrices(weight, ls.layer, "channel").astype(np.float64)
        scales = np.abs(matrices).max(axis=2, keepdims=True) / 7
        delta = np.clip(np.rint(matrices / scales), -7, 7) * scales - matrices
        quantized = matrices_to_weight(matrices + delta, ls.layer, "channel").astype(np.float32)
        measured = measure_loss(model, _batches(calib), classification_loss, {ls.layer.weight: quantized}) - base
        assert abs(measured - ls.perturbation_dloss(delta)) <= 0.005 + 0.5 * abs(measured), ls.layer.node


def test_without_first_order_terms_the_curvature_alone_orders_and_predicts(small_cnn):
    model, data = small_cnn
    calib = data.subset(np.arange(300))
    with_first = analyze(model, _batches(calib), classification_loss, spatial=True)
    curvature_only = analyze(model, _batches(calib), classification_loss, spatial=True, first_order=False)
    assert any(np.abs(ls.first_order).max() > 0 for ls in with_first.all())
    for ls, same in zip(curvature_only.all(), with_first.all()):
        np.testing.assert_array_equal(ls.s, same.s)  # the same basis
        assert not ls.first_order.any() and ls.replication == 0.0
        # Cheapest first by the quadratic term alone, and a predicted change that never goes below 0.
        quadratic = np.take_along_axis(ls.quadratic, ls.drop_order(), axis=1)
        assert (np.diff(quadratic, axis=1) >= 0).all()
        assert (ls.predicted_dloss() >= 0).all()


def test_analysis_micro_batches_keep_one_forward_pass_within_the_bound(small_cnn, monkeypatch):
    import onnxlrf.measure.analysis as analysis_module

    model, data = small_cnn
    _, per_sample = TorchGraph(model).value_bytes(data.subset([0]).inputs)
    assert analysis_batch_size(model, data, 50) == 50  # far within 3 GiB
    monkeypatch.setattr(analysis_module, "ANALYSIS_BATCH_BYTES", 7 * per_sample + 1)
    assert analysis_batch_size(model, data, 50) == 7
    monkeypatch.setattr(analysis_module, "ANALYSIS_BATCH_BYTES", 1)
    assert analysis_batch_size(model, data, 50) == 1


def test_spatial_metric_equals_the_channel_metric_for_separable_input_statistics():
    """Where the patch moment A is a Kronecker product over (channel, row) and column, the spatial
    factors measure every weight change exactly as the channel K-FAC metric tr(dW^T B dW A) does."""
    rng = np.random.default_rng(0)
    cout, cin, kh, kw = 5, 3, 3, 3
    layer = Layer("conv", "Conv", "w", (cout, cin, kh, kw), 1, cout, cin * kh * kw, (kh, kw),
                  ("channel", "spatial"), cout * cin * kh * kw)

    def psd(size: int) -> np.ndarray:
        f = rng.standard_normal((size, size))
        return f @ f.T + 0.1 * np.eye(size)

    a = torch.from_numpy(np.kron(psd(cin * kh), psd(kw)))[None]  # patch index (c, i, j), j fastest
    b = torch.from_numpy(psd(cout))[None]
    rows, cols = _spatial_factors(a, b, layer)
    for _ in range(3):
        dw = rng.standard_normal((cout, cin, kh, kw))
        dc = torch.from_numpy(weight_matrices(dw, layer, "channel"))
        dm = torch.from_numpy(weight_matrices(dw, layer, "spatial"))
        channel = torch.einsum("gmn,gmp,gpq,gnq->", dc, b, dc, a)
        spatial = torch.einsum("gmn,gmp,gpq,gnq->", dm, rows, dm, cols)
        assert float(spatial) == pytest.approx(float(channel), rel=1e-9)


def test_joint_planner_chooses_spatial_candidates_and_the_rewrite_keeps_them(small_cnn):
    """With only spatial candidates trusted for the convs, the plan factorizes them spatially in the
    joint basis, and the rewritten model computes the plan's truncated weights."""
    model, data = small_cnn
    calib = data.subset(np.arange(400))
    sens = analyze(model, _batches(calib), classification_loss, spatial=True)
    assert not analyze(model, _batches(calib), classification_loss).spatial  # opt-in
    measure_ranges(model, sens, _batches(calib.subset(np.arange(200))), classification_loss)
    for node in sens.spatial:
        sens.layers[node].perturbation_range = 0.0  # channel truncations of the convs untrusted
        sens.spatial[node].perturbation_range = np.inf
    plan = plan_joint(model, sens, "lossless", target_reduction=0.1, kappa=4.0)
    factorized = {e.node: e for e in plan.layers if e.decomposition != "dense"}
    spatial = [e for e in factorized.values() if e.decomposition == "spatial"]
    assert spatial and all(e.node in sens.spatial for e in spatial)
    assert all(e.decomposition == "spatial" for e in factorized.values() if e.node in sens.spatial)
    compressed, report = apply_plan(model, plan)
    assert report.params_before - report.params_after >= 0.1 * count_params(model)
    truncated = {}
    for entry in factorized.values():
        ls = sens.get(entry.node, entry.decomposition)
        truncated[ls.layer.weight] = matrices_to_weight(ls.reconstruct(ls.keep(entry.rank)), ls.layer,
                                                        entry.decomposition).astype(np.float32)
    feeds = {"input": data.inputs["input"][:32]}
    expected = measure_outputs(model, feeds, truncated)
    got = ort.InferenceSession(compressed.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-4)


def test_refit_of_an_all_spatial_plan_is_not_evaluated_again(small_cnn, monkeypatch):
    """The refit keeps spatial layers as planned: a plan with nothing else has nothing to refit,
    and the back-off does not evaluate the same model a second time."""
    from onnxlrf.costs.params import ParamsCost
    from onnxlrf.progress import Progress
    from onnxlrf.techniques.lowrank.technique import LOWRANK
    from onnxlrf.verify import backoff as backoff_module
    from onnxlrf.verify.search import Score, Verified

    model, data = small_cnn
    calib = data.subset(np.arange(200))
    sens = analyze(model, _batches(calib), classification_loss, spatial=True)
    measure_ranges(model, sens, _batches(calib), classification_loss)
    for ls in sens.layers.values():
        ls.perturbation_range = 0.0  # only spatial truncations trusted
    plan = plan_joint(model, sens, "lossless", target_reduction=0.05, kappa=4.0)
    assert {e.decomposition for e in plan.layers} == {"spatial", "dense"}
    monkeypatch.setattr(backoff_module, "model_outputs", lambda *args, **kwargs: pytest.fail("evaluated again"))
    backoff: list = []
    evaluator = backoff_module.ValidationEvaluator(model, calib, LOWRANK, ParamsCost(model), "cpu",
                                                   Progress(bars=False), reference_score=Score(0.5))
    chosen = Verified(0.5, plan, None, None, None)
    assert backoff_module.refit_chosen(model, chosen, [plan], calib, evaluator, LOWRANK, Progress(bars=False),
                                       backoff) is None
    assert backoff == []


def measure_outputs(model: onnx.ModelProto, feeds: dict, weights: dict) -> np.ndarray:
    """The model's first output with some weights replaced, run in onnxruntime."""
    changed = onnx.ModelProto()
    changed.CopyFrom(model)
    for init in changed.graph.initializer:
        if init.name in weights:
            init.CopyFrom(onnx.numpy_helper.from_array(weights[init.name], init.name))
    return ort.InferenceSession(changed.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def test_cholesky_basis_equals_the_symmetric_square_root_basis():
    """The basis is the SVD of B^(1/2) W A^(1/2); Cholesky factors must give the same x, s, y."""
    rng = np.random.default_rng(0)
    g, m, n = 2, 12, 20
    w = torch.from_numpy(rng.standard_normal((g, m, n)))

    def psd(size: int, rank: int) -> torch.Tensor:  # rank-deficient, as for dead channels
        f = rng.standard_normal((g, size, rank)) * rng.uniform(0.1, 10.0, rank)
        return torch.from_numpy(f @ f.transpose(0, 2, 1))

    b, a = psd(m, m - 3), psd(n, n // 2)
    x, s, y = _joint_basis(w, b, a)
    left, left_inv = _sqrt_and_inverse(b)
    right, right_inv = _sqrt_and_inverse(a)
    u, s_ref, vh = torch.linalg.svd(left @ w @ right, full_matrices=False)
    x_ref, y_ref = left_inv @ u, right_inv @ vh.transpose(-1, -2)
    np.testing.assert_allclose(s, s_ref, rtol=1e-9)
    # Singular vectors are defined up to a common sign per component.
    signs = torch.sign((x * x_ref).sum(1, keepdim=True))
    np.testing.assert_allclose(x * signs, x_ref, rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(y * signs, y_ref, rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(x @ torch.diag_embed(s) @ y.transpose(-1, -2), w, atol=1e-10)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("channels_last", [False, True])
def test_pointwise_conv_rows_are_the_unfolded_patches(stride, channels_last):
    x = torch.randn(3, 5, 7, 6)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    node = onnx.helper.make_node("Conv", ["x", "w"], ["y"], strides=[stride, stride])
    rows = _unfold_inputs(node, x, (4, 5, 1, 1))
    cols = torch.nn.functional.unfold(x, [1, 1], stride=stride)
    assert torch.equal(rows, cols.transpose(1, 2).reshape(-1, 5))


def test_planners_respect_target_and_dp_is_exact(small_cnn):
    model, data = small_cnn
    calib = data.subset(np.arange(400))
    sens = analyze(model, _batches(calib), classification_loss)
    measure_ranges(model, sens, _batches(calib.subset(np.arange(200))), classification_loss)
    total = count_params(model)
    for target in (0.05, 0.1, 0.2):
        lag = plan_joint(model, sens, "lossless", target_reduction=target, kappa=4.0)
        dp = plan_joint(model, sens, "lossless", target_reduction=target, kappa=4.0, solver="dp")
        milp = plan_joint(model, sens, "lossless", target_reduction=target, kappa=4.0, solver="milp")
        for plan in (lag, dp, milp):
            compressed, report = apply_plan(model, plan)
            assert report.params_before - report.params_after >= target * total
            assert count_params(compressed) == report.params_after
            assert plan.options["achieved_reduction"] == pytest.approx(1 - report.params_after / total)
        assert dp.options["predicted_dloss"] <= lag.options["predicted_dloss"] + 1e-9
        # the DP counts parameters in units, rounded down; the MILP counts them exactly
        exact, floored = milp.options["predicted_dloss"], dp.options["predicted_dloss"]
        assert exact <= floored + 1e-6 * abs(floored)
    for kind in ("fwsvd", "whitened"):
        for ls in sens.layers.values():
            x, s, yt = baseline_basis(ls, kind)
            assert np.all(np.diff(s, axis=1) <= 1e-12)
            np.testing.assert_allclose((x * s[:, None, :]) @ yt, ls.reconstruct(ls.keep(ls.s.shape[1])), atol=1e-8)
        plan = plan_baseline(model, sens, kind, 0.1)
        _, report = apply_plan(model, plan)
        assert report.params_before - report.params_after >= 0.1 * total
    compact = plan_joint(model, sens, "compact", tolerance=0.0, kappa=4.0)
    assert compact.options["predicted_dloss"] <= 0.0
    for entry in compact.layers:
        if entry.decomposition != "dense":
            assert entry.notes["relative_error"] <= entry.notes["perturbation_range"] + 1e-12


@pytest.fixture(scope="module")
def compact_once(small_cnn):
    model, data = small_cnn
    return run_joint(model, data, "compact", calib=400, val=400, seed=3, provider="cpu")


def test_compact_never_below_original_on_validation_and_is_deterministic(small_cnn, compact_once, tmp_path):
    model, data = small_cnn
    first = compact_once
    assert first.splits["val"]["value"] >= first.splits["val"]["reference_value"]
    assert first.splits["test"]["samples"] == len(data) - 800
    for name in ("calib", "test"):  # both models ran on these splits here
        split = first.splits[name]
        low, high = split["change_interval"]
        assert low <= split["value"] - split["reference_value"] <= high
    assert "change_interval" not in first.splits["val"]
    again = run_joint(model, data, "compact", calib=400, val=400, seed=3, provider="cpu")
    assert again.plan.to_json() == first.plan.to_json()
    assert again.compressed.SerializeToString() == first.compressed.SerializeToString()
    # The plan and its bases survive a round trip through disk and rewrite to the same model.
    first.plan.save(tmp_path / "plan.json")
    loaded = Plan.load(tmp_path / "plan.json")
    rewritten, _ = apply_plan(model, loaded)
    feeds = {"input": data.inputs["input"][:32]}
    run = lambda m: ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    np.testing.assert_allclose(run(rewritten), run(first.compressed), rtol=1e-5, atol=1e-5)


def test_splits_are_disjoint_and_fixed_by_seed(small_cnn):
    _, data = small_cnn
    indexed = Dataset("idx", "classification", {"input": np.arange(len(data))[:, None]}, data.labels)
    a = split_dataset(indexed, 300, 200, seed=7)
    b = split_dataset(indexed, 300, 200, seed=7)
    ids = [set(s.inputs["input"][:, 0]) for s in (a.calib, a.val, a.test)]
    assert sum(map(len, ids)) == len(data) and not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    assert np.array_equal(a.test.inputs["input"], b.test.inputs["input"])


def test_range_checks_measure_each_truncation_as_a_full_run_does_in_chunks_or_not(small_cnn, monkeypatch):
    """Batch by batch, each truncation resumes at its layer from one run of the original (in chunks of layers
    when their truncated weights would not fit at once): the loss changes of full runs with that layer truncated."""
    model, data = small_cnn
    calib = data.subset(np.arange(300))
    sens = analyze(model, _batches(calib), classification_loss)
    measure_ranges(model, sens, _batches(calib), classification_loss)
    base = measure_loss(model, _batches(calib), classification_loss)
    for ls in sens.layers.values():
        for check in ls.range_checks:
            weight = matrices_to_weight(ls.reconstruct(ls.keep(check["rank"])), ls.layer, "channel").astype(np.float32)
            full = measure_loss(model, _batches(calib), classification_loss, {ls.layer.weight: weight}) - base
            assert check["measured"] == pytest.approx(full, rel=1e-4, abs=1e-6)
    whole = {node: [c["measured"] for c in ls.range_checks] for node, ls in sens.layers.items()}
    monkeypatch.setattr(sensitivity_module, "RANGE_CHUNK_BYTES", 1)  # one truncation per chunk
    measure_ranges(model, sens, _batches(calib), classification_loss)
    for node, ls in sens.layers.items():
        np.testing.assert_allclose([c["measured"] for c in ls.range_checks], whole[node], rtol=1e-6, atol=1e-9)
    # A truncation paired with its bias change (bias correction) runs in full, the shift added.
    corrected = analyze(model, _batches(calib), classification_loss, bias_correction=True)
    measure_ranges(model, corrected, _batches(calib), classification_loss)
    ls = next(iter(corrected.layers.values()))
    check = ls.range_checks[0]
    keep = ls.keep(check["rank"])
    weight = matrices_to_weight(ls.reconstruct(keep), ls.layer, "channel").astype(np.float32)
    full = measure_loss(model, _batches(calib), classification_loss, {ls.layer.weight: weight},
                        output_shifts={ls.layer.node: ls.output_shift(keep)}) - base
    assert check["measured"] == pytest.approx(full, rel=1e-4, abs=1e-6)


def test_replacement_gains_equal_full_runs_with_each_weight_replaced(small_cnn):
    """Each replacement resumes at its first reader from one run per batch: the same loss falls as full runs."""
    model, data = small_cnn
    calib = data.subset(np.arange(300))
    sens = analyze(model, _batches(calib), classification_loss)
    replacements = {}
    for ls in sens.layers.values():
        rank = max(1, ls.s.shape[1] // 3)
        replacements[ls.layer.node] = {
            ls.layer.weight: matrices_to_weight(ls.reconstruct(ls.keep(rank)), ls.layer, "channel").astype(np.float32)}
    base = measure_loss(model, _batches(calib), classification_loss)
    gains = replacement_gains(model, replacements, _batches(calib, 64), classification_loss)
    assert list(gains) == list(replacements)
    for node, weights in replacements.items():
        full = base - measure_loss(model, _batches(calib), classification_loss, weights)
        assert gains[node] == pytest.approx(full, rel=1e-4, abs=1e-6)
    assert min(gains.values()) < -0.01  # truncating two thirds of a trained layer raises its loss


@pytest.mark.parametrize("mode, target, spatial", [("compact", None, False), ("lossless", 0.3, False),
                                                   ("compact", None, True)])
def test_rounds_expand_around_the_truncated_weights(small_cnn, mode, target, spatial):
    model, data = small_cnn
    # Without the refit, which one round applies to its back-off's plans and more rounds to the final plan only.
    kwargs = dict(target_reduction=target, calib=400, val=400, seed=3, provider="cpu", refit=False, spatial=spatial)
    one = run_joint(model, data, mode, **kwargs)
    two = run_joint(model, data, mode, rounds=2, **kwargs)
    # Held to the original's validation metric in every round; the plan rewrites the original model.
    assert two.splits["val"]["reference_value"] == one.splits["val"]["reference_value"]
    history = two.plan.options.get("rounds", [])
    if mode == "compact":
        assert two.splits["val"]["value"] >= two.splits["val"]["reference_value"]
        assert two.plan.options["params_reduction"] >= one.plan.options["params_reduction"]
        assert [h["params_reduction"] for h in history] == sorted(h["params_reduction"] for h in history)
    else:
        assert [h["round"] for h in history] == [1, 2]
        assert history[0]["achieved_reduction"] >= 0.15 and two.plan.options["achieved_reduction"] >= 0.3
    assert {e.round for e in two.backoff} <= {1, 2}
    # Every round's analysis offered the spatial decompositions too (or not), and the plan says so.
    assert ("spatial" in two.plan.options["decompositions"]) == spatial
    assert ("spatial" in {ls.decomposition for ls in two.sensitivity.all()}) == spatial
    rewritten, _ = apply_plan(model, two.plan)
    assert rewritten.SerializeToString() == two.compressed.SerializeToString()


def test_rounds_refit_the_final_plan_only(small_cnn):
    model, data = small_cnn
    result = run_joint(model, data, "lossless", target_reduction=0.3, calib=400, val=400, seed=3,
                            provider="cpu", rounds=2)
    refit = [e for e in result.backoff if e.refit]
    assert [e.round for e in refit] == [2]
    (chosen,) = [e for e in result.backoff if e.chosen and e.round == 2]
    assert (chosen is refit[0]) == ("refit" in {e.basis for e in result.plan.layers})
    # Classified data: the last round chose by the validation loss, and the refit is kept only where it lowers it.
    assert result.plan.options["select"] == "loss"
    last = [e for e in result.backoff if e.round == 2 and not e.refit and e.val is not None and e.same_as_kappa is None]
    assert (chosen is refit[0]) == (refit[0].loss_change < min(e.loss_change for e in last))
    rewritten, _ = apply_plan(model, result.plan)
    assert rewritten.SerializeToString() == result.compressed.SerializeToString()


def test_a_layer_a_later_round_keeps_dense_stays_at_its_earlier_truncation(small_cnn):
    from onnxlrf.costs.params import cost_model
    from onnxlrf.techniques.lowrank.planners import plan_uniform
    from onnxlrf.verify.rounds import merge_rounds

    model, _ = small_cnn
    earlier = plan_uniform(model, rank_fraction=0.5)
    later = plan_uniform(model, rank_fraction=0.25)
    first = next(i for i, e in enumerate(later.layers) if e.decomposition != "dense")
    later.layers[first] = dataclasses.replace(later.layers[first], decomposition="dense", rank=None)
    merged = merge_rounds(model, earlier, later, cost_model(model))
    assert merged.layers[first] == earlier.layers[first]
    assert merged.layers[first + 1:] == later.layers[first + 1:]
    removed = sum(e.params_dense - e.params_planned for e in merged.layers)
    assert merged.options["params_reduction"] == pytest.approx(removed / count_params(model))


def test_input_statistics_count_real_tokens_only():
    """K-FAC's input factor over the tokens that reach the output: padding has zero gradient, so it only diluted A."""
    model = token_encoder()
    data = token_pairs(padding_ids=0)
    sens = analyze(model, _batches(data), similarity_loss, token_mask="attention_mask")
    mask = data.inputs["attention_mask"] == 1
    embedding = onnx.numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "embedding"))
    real = embedding[data.inputs["input_ids"][mask]].astype(np.float64)
    np.testing.assert_allclose(sens.layers["fc1"].input_moment[0], real.T @ real / len(real), rtol=1e-5, atol=1e-6)

    repadded = analyze(model, _batches(token_pairs(padding_ids=39)), similarity_loss, token_mask="attention_mask")
    for node, ls in sens.layers.items():
        np.testing.assert_allclose(repadded.layers[node].input_moment, ls.input_moment, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(repadded.layers[node].s, ls.s, rtol=1e-4)
        np.testing.assert_allclose(repadded.layers[node].first_order, ls.first_order, rtol=1e-3, atol=1e-9)
    unmasked = analyze(model, _batches(data), similarity_loss)
    assert not np.allclose(unmasked.layers["fc1"].input_moment, sens.layers["fc1"].input_moment, rtol=1e-3)
    # The joint method reads the mask's name from the dataset.
    joint = joint_analysis(model, data, AnalysisOptions(range_samples=50))
    np.testing.assert_allclose(joint.layers["fc2"].input_moment, sens.layers["fc2"].input_moment, rtol=1e-5)


def test_compact_searches_sizes_where_no_component_is_free():
    """Label-free similarity targets: every drop raises the loss, so tolerance 0 admits none, and
    compact mode finds its size on validation instead (the largest tried plan that holds)."""
    from onnxlrf.verify.backoff import backoff_plan
    from onnxlrf.verify.search import AcceptanceRule

    model, data = _encoder_pairs(pairs=400, model=token_encoder(decay=0.8), seq=6)  # two 24x24 layers, vocabulary 40
    calib, val = data.subset(np.arange(200)), data.subset(np.arange(200, 400))
    sens = joint_analysis(model, calib, AnalysisOptions(labels="predictions", range_samples=100))
    reference_val = val.score(TorchGraph(model)(val.inputs)[0].detach().numpy())
    # The metric alone judges here (the size search's mechanics; the loss test is tests/verify's).
    result = backoff_plan(model, sens, val, PlanOptions("compact"), calib=calib, provider="cpu",
                          rule=AcceptanceRule(loss_z=None))
    plan, backoff = result.plan, [attempt.to_dict() for attempt in result.attempts]
    assert plan.options["backoff"] == backoff
    searched = [e for e in backoff if "target_reduction" in e]
    assert backoff[0]["achieved_reduction"] == 0 and searched  # nothing free at tolerance 0: sizes searched
    assert searched[0]["target_reduction"] == 0.01
    held = [e for e in searched if e["val"] >= reference_val]
    assert held and any(e["val"] < reference_val for e in searched)
    (chosen,) = [e for e in backoff if e.get("chosen")]
    assert chosen["val"] >= reference_val and chosen["achieved_reduction"] > 0
    assert chosen["achieved_reduction"] >= max(e["achieved_reduction"] for e in held)
    assert plan.options["achieved_reduction"] == chosen["achieved_reduction"]
    assert plan.mode == "compact" and plan.options["size_search"]


def test_spatial_candidates_default_on_for_flops_targets_only(small_cnn):
    model, data = small_cnn
    kwargs = dict(calib=200, val=200, seed=1, provider="cpu", refit=False)
    flops = run_joint(model, data, "lossless", target_reduction=0.1, target="flops", **kwargs)
    assert flops.plan.options["decompositions"] == ["channel", "spatial"] and flops.sensitivity.spatial
    params = run_joint(model, data, "lossless", target_reduction=0.1, **kwargs)
    assert params.plan.options["decompositions"] == ["channel"] and not params.sensitivity.spatial


def _same_analysis(one, two) -> None:
    assert (one.reference_loss, one.samples, one.loss) == (two.reference_loss, two.samples, two.loss)
    assert [(ls.layer.node, ls.decomposition) for ls in one.all()] == [(ls.layer.node, ls.decomposition)
                                                                     for ls in two.all()]
    for a, b in zip(one.all(), two.all()):
        assert a.layer == b.layer
        for name in ("s", "x", "y", "first_order", "input_moment", "input_mean", "output_fisher"):
            assert (getattr(a, name) is None) == (getattr(b, name) is None), name
            if getattr(a, name) is not None:
                np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
        assert (a.weight_norm, a.curvature_scale, a.perturbation_range, a.range_checks) == \
            (b.weight_norm, b.curvature_scale, b.perturbation_range, b.range_checks)


def test_saved_analysis_reads_back_as_it_was(small_cnn, tmp_path):
    """Every array, fitted scale, range and check, in both decompositions, and so the same plans."""
    from onnxlrf.measure.sensitivity import Sensitivity

    model, data = small_cnn
    sens = joint_analysis(model, data.subset(np.arange(200)), AnalysisOptions(range_samples=100, spatial=True))
    assert sens.spatial and any(ls.perturbation_range > 0 for ls in sens.all())
    sens.save(tmp_path / "analysis", key="made from this")  # no suffix is added
    loaded, key = Sensitivity.load(tmp_path / "analysis")
    assert key == "made from this"
    _same_analysis(sens, loaded)
    for kappa in (1.0, 8.0):
        assert plan_joint(model, loaded, "lossless", target_reduction=0.2, kappa=kappa).to_dict() == \
            plan_joint(model, sens, "lossless", target_reduction=0.2, kappa=kappa).to_dict()


def test_analysis_that_cannot_be_read_is_a_one_line_error(tmp_path):
    from onnxlrf.errors import OnnxlrfError
    from onnxlrf.measure.sensitivity import Sensitivity

    (tmp_path / "text.npz").write_text("not an analysis")
    np.savez(tmp_path / "other.npz", header=np.array('{"format": "something else"}'))
    for name, message in (("text.npz", "cannot read the analysis"), ("other.npz", "expected onnxlrf.analysis"),
                          ("missing.npz", "No such file")):
        with pytest.raises(OnnxlrfError, match=message) as caught:
            Sensitivity.load(tmp_path / name)
        assert "\n" not in str(caught.value)


def test_analysis_cache_reuses_an_analysis_only_for_the_same_model_split_and_options(small_cnn, tmp_path,
                                                                                      monkeypatch):
    import onnxlrf.measure.analysis as analysis_module
    from onnxlrf.progress import Progress

    model, data = small_cnn
    kwargs = dict(calib=200, val=200, seed=1, provider="cpu", refit=False)
    cache = tmp_path / "analyses"
    first = run_joint(model, data, "lossless", target_reduction=0.1, analysis_cache=cache, **kwargs)
    (saved,) = cache.iterdir()
    fresh = run_joint(model, data, "lossless", target_reduction=0.2, **kwargs)  # no cache: analyzed

    def no_analysis(*args, **kwargs):
        raise AssertionError("analyzed again")

    monkeypatch.setattr(analysis_module, "_analyze", no_analysis)
    log = io.StringIO()
    cached = run_joint(model, data, "lossless", target_reduction=0.2, analysis_cache=cache,
                            progress=Progress(stream=log, bars=False), **kwargs)
    assert f"analysis: read from the cache, {saved}" in log.getvalue()
    assert cached.plan.to_dict() == fresh.plan.to_dict()
    assert cached.splits["test"]["value"] == fresh.splits["test"]["value"]
    _same_analysis(cached.sensitivity, first.sensitivity)
    assert list(cache.iterdir()) == [saved]
    # Another calibration split, other targets, another decomposition set or other weights: analyzed anew.
    changed_weights = onnx.ModelProto()
    changed_weights.CopyFrom(model)
    changed_weights.graph.initializer[0].raw_data = bytes(len(changed_weights.graph.initializer[0].raw_data))
    for call in (dict(model=model, seed=2), dict(model=model, labels="predictions"), dict(model=model, spatial=True),
                 dict(model=model, first_order=True), dict(model=changed_weights)):
        options = {**kwargs, **call}
        with pytest.raises(AssertionError, match="analyzed again"):
            run_joint(options.pop("model"), data, "lossless", target_reduction=0.1, analysis_cache=cache,
                           **options)


def test_analysis_cache_entry_that_cannot_be_read_is_replaced(small_cnn, tmp_path):
    model, data = small_cnn
    calib = data.subset(np.arange(150))
    sens = joint_analysis(model, calib, AnalysisOptions(range_samples=50, cache=tmp_path))
    (entry,) = tmp_path.iterdir()
    entry.write_bytes(b"truncated")
    again = joint_analysis(model, calib, AnalysisOptions(range_samples=50, cache=tmp_path))
    _same_analysis(sens, again)
    assert [p.name for p in tmp_path.iterdir()] == [entry.name] and entry.stat().st_size > 1000


def test_conv_transpose_and_3d_conv_are_left_out_of_the_analysis_and_stay_dense_with_the_reason():
    """The analysis has no input statistics for a ConvTranspose or a 3-D conv (a 3-D conv used to stop it):
    they are left out, and joint plans keep them dense saying why."""
    rng = np.random.default_rng(0)
    inits = {name: (0.3 * rng.standard_normal(shape)).astype(np.float32) for name, shape in
             {"t.w": (3, 4, 2, 2), "c.w": (6, 4, 3, 3), "c3.w": (6, 2, 2, 2, 2), "fc.w": (6, CLASSES)}.items()}
    inits["shape"] = np.array([0, -1], np.int64)
    nodes = [onnx.helper.make_node("ConvTranspose", ["x", "t.w"], ["t"], name="convt", strides=[2, 2]),
             onnx.helper.make_node("Conv", ["t", "c.w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             onnx.helper.make_node("GlobalAveragePool", ["c"], ["p"], name="pool"),
             onnx.helper.make_node("Conv", ["v", "c3.w"], ["c3"], name="conv3d"),
             onnx.helper.make_node("GlobalAveragePool", ["c3"], ["p3"], name="pool3d"),
             onnx.helper.make_node("Reshape", ["p", "shape"], ["f"], name="flat"),
             onnx.helper.make_node("Reshape", ["p3", "shape"], ["f3"], name="flat3d"),
             onnx.helper.make_node("Add", ["f", "f3"], ["h"], name="add"),
             onnx.helper.make_node("MatMul", ["h", "fc.w"], ["y"], name="fc")]
    graph = onnx.helper.make_graph(
        nodes, "g", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", 3, 4, 4]),
                     onnx.helper.make_tensor_value_info("v", onnx.TensorProto.FLOAT, ["n", 2, 3, 3, 3])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n", CLASSES])],
        [onnx.numpy_helper.from_array(value, name) for name, value in inits.items()])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    batches = [({"x": rng.standard_normal((8, 3, 4, 4)).astype(np.float32),
                 "v": rng.standard_normal((8, 2, 3, 3, 3)).astype(np.float32)}, rng.integers(0, CLASSES, 8))
               for _ in range(2)]
    sens = analyze(model, lambda: iter(batches), classification_loss)
    assert sorted(sens.layers) == ["conv", "fc"]
    plan = plan_joint(model, sens, "compact", tolerance=1.0)
    reasons = {entry.node: entry.notes.get("reason") for entry in plan.layers if entry.decomposition == "dense"}
    assert reasons["convt"].startswith("not analyzed: the joint analysis has no input statistics for a "
                                       "ConvTranspose")
    assert reasons["conv3d"].startswith("not analyzed: the joint analysis unfolds the inputs of 1-D and 2-D "
                                        "convs, not 3-D")


def test_layer_whose_factors_exceed_half_the_free_memory_stays_dense(small_cnn, monkeypatch):
    from onnxlrf.costs.params import ParamsCost
    from onnxlrf.measure import sensitivity
    from onnxlrf.techniques.lowrank.planners import unplanned_entry

    model, data = small_cnn
    layers = {layer.node: layer for layer in find_layers(model)[0]}
    largest = max(layers.values(), key=sensitivity.factor_bytes)
    # Room for every layer's factors but the largest's.
    copies = sensitivity.HELD_FACTOR_COPIES + sensitivity.BASIS_FACTOR_COPIES
    monkeypatch.setattr(sensitivity, "free_memory", lambda: 2.0 * (copies * sensitivity.factor_bytes(largest) - 1))
    sens = analyze(model, _batches(data.subset(np.arange(200))), classification_loss)
    assert set(sens.left_out) == {largest.node} and largest.node not in sens.layers
    assert set(sens.layers) == set(layers) - {largest.node}
    reason = unplanned_entry(largest, sens, ParamsCost(model)).notes["reason"]
    assert reason.startswith("not analyzed: its Kronecker factors (") and "half of the memory free" in reason


def test_micro_batches_shrink_to_half_the_free_memory(small_cnn, monkeypatch):
    from onnxlrf.measure import analysis, sensitivity

    model, data = small_cnn
    per_sample = analysis.ANALYSIS_MEMORY_PER_VALUE_BYTE * TorchGraph(model).value_bytes(
        data.subset(np.arange(1)).inputs)[1]
    free = 2.0 * 20 * per_sample
    monkeypatch.setattr(sensitivity, "free_memory", lambda: free)
    held = sensitivity.factors_in_memory(sensitivity.covered_layers(find_layers(model)[0]), free / 2)[1]
    assert 0 < held < free / 2  # the factors take part of the budget, the micro-batch the rest
    assert analysis.samples_in_memory(model, data, 50) == int((free / 2 - held) // per_sample) < 20
    assert analysis.samples_in_memory(model, data, 1) == 1
    monkeypatch.setattr(sensitivity, "free_memory", lambda: 1.0)
    assert analysis.samples_in_memory(model, data, 50) == 1
