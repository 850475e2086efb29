"""Bad input through the CLI: exit status 1, one line ``Error: ...`` naming the problem, no file written or changed.

Complements tests/test_cli.py (missing, non-ONNX and truncated files, unknown models, data that does not
fit, edited plans, output equal to input, existing outputs, on ResNet-20) with the remaining cases, on a
small model built here: external data missing, checkpoints that do not fit, NaN/Inf in weights and data,
data of the wrong dtype, a full disk and an interrupted run, and the bases file of a joint plan.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner, Result
from test_pipeline import mlp as compress_mlp

from onnxlrf.cli import cli
from onnxlrf.onnx_io import save_onnx

IN, HIDDEN, CLASSES = 24, 32, 5


def mlp(nonfinite: float | None = None) -> onnx.ModelProto:
    """The compress tests' MLP at this file's sizes (the error messages below name them)."""
    return compress_mlp(IN, HIDDEN, CLASSES, nonfinite)


def invoke(*args: object) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args])


def snapshot(directory: Path) -> dict[str, str]:
    """Every file under ``directory`` (hidden temporaries included) with its content hash."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def assert_one_line_error(result: Result, expected: str) -> None:
    """Exit status 1, no traceback, and the error is the last line of stderr (progress lines may precede it)."""
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), result.exception
    lines = result.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("Error: ") and expected in lines[-1], result.stderr
    assert sum(line.startswith("Error") for line in lines) == 1 and "Traceback" not in result.stderr
    assert result.stdout == ""


@pytest.fixture()
def files(tmp_path: Path) -> dict[str, Path]:
    """Inputs in ``tmp_path``: the model (one file and with external data), data, a plan, and bad variants."""
    model = tmp_path / "mlp.onnx"
    onnx.save(mlp(), str(model))
    external = save_onnx(mlp(), tmp_path / "ext.onnx", external_data=True)
    (tmp_path / "ext.onnx.data").rename(tmp_path / "moved.data")  # external data missing
    nan_model, inf_model = tmp_path / "nan.onnx", tmp_path / "inf.onnx"
    onnx.save(mlp(float("nan")), str(nan_model))
    onnx.save(mlp(float("-inf")), str(inf_model))
    x = np.random.default_rng(1).standard_normal((40, IN)).astype(np.float32)
    labels = np.arange(40, dtype=np.int64) % CLASSES
    data = tmp_path / "data.npz"
    np.savez(data, x=x, labels=labels)
    nan_data = tmp_path / "nan_data.npz"
    np.savez(nan_data, x=np.where(np.arange(IN) == 3, np.nan, x).astype(np.float32), labels=labels)
    f64_data = tmp_path / "f64_data.npz"
    np.savez(f64_data, x=x.astype(np.float64), labels=labels)
    plan = tmp_path / "plan.json"
    result = invoke("compress", model, "-o", tmp_path / "small.onnx", "--mode", "uniform", "--rank-fraction", 0.5,
                    "--plan-out", plan)
    assert result.exit_code == 0, result.output
    (tmp_path / "small.onnx").unlink()
    edited = json.loads(plan.read_text())
    choice = edited["layers"][0]["choice"]
    choice["rank"] = choice["max_rank"] + 1
    too_large = tmp_path / "rank_too_large.json"
    too_large.write_text(json.dumps(edited))
    choice["rank"], edited["layers"][0]["node"] = 2, "no_such_node"
    no_node = tmp_path / "no_node.json"
    no_node.write_text(json.dumps(edited))
    (tmp_path / "existing.onnx").write_bytes(b"precious")
    return {"dir": tmp_path, "model": model, "external": external, "nan": nan_model, "inf": inf_model,
            "data": data, "nan_data": nan_data, "f64_data": f64_data, "plan": plan, "too_large": too_large,
            "no_node": no_node, "out": tmp_path / "out.onnx", "existing": tmp_path / "existing.onnx"}


COMPRESS = ["compress", "{model}", "-o", "{out}", "--mode", "uniform", "--rank-fraction", "0.5"]
JOINT = ["compress", "{model}", "-o", "{out}", "--mode", "compact", "--data", "npz:{data}"]
CASES = {
    # id: (argv with {name} from the files fixture, expected text in the message)
    "compress-external-data-missing": (["compress", "{external}", "-o", "{out}", "--mode", "uniform",
                                        "--rank-fraction", "0.5"], "external data of tensor 'w1' not found"),
    "rewrite-external-data-missing": (["rewrite", "{external}", "--plan", "{plan}", "-o", "{out}"],
                                      "external data of tensor 'w1' not found"),
    "validate-external-data-missing": (["validate", "{external}", "--data", "npz:{data}"],
                                       "external data of tensor 'w1' not found"),
    "inspect-external-data-missing": (["inspect", "{external}"], "external data of tensor 'w1' not found"),
    "compress-nan-weight": (["compress", "{nan}", "-o", "{out}", "--mode", "uniform", "--rank-fraction", "0.5"],
                            "weight 'w1' of the model contains NaN or Inf"),
    "rewrite-inf-weight": (["rewrite", "{inf}", "--plan", "{plan}", "-o", "{out}"],
                           "weight 'w1' of the model contains NaN or Inf"),
    "compress-nan-data": (COMPRESS + ["--data", "npz:{nan_data}"], "data input 'x' of npz:"),
    "validate-nan-data": (["validate", "{model}", "--data", "npz:{nan_data}"], "contains NaN or Inf"),
    "compress-data-dtype": (COMPRESS + ["--data", "npz:{f64_data}"], "expected float32[batch,24], got float64"),
    "validate-data-dtype": (["validate", "{model}", "--data", "npz:{f64_data}"], "got float64[40,24]"),
    "rewrite-plan-rank-too-large": (["rewrite", "{model}", "--plan", "{too_large}", "-o", "{out}"],
                                    "plan node 'fc1': rank 25 outside 1..24"),
    "rewrite-plan-no-such-node": (["rewrite", "{model}", "--plan", "{no_node}", "-o", "{out}"],
                                  "plan node 'no_such_node' does not exist"),
    "rewrite-output-is-plan": (["rewrite", "{model}", "--plan", "{plan}", "-o", "{plan}", "--overwrite"],
                               "same as input"),
    "compress-plan-out-is-input": (COMPRESS + ["--plan-out", "{model}", "--overwrite"], "same as input"),
    "compress-output-is-data": (["compress", "{model}", "-o", "{data}", "--mode", "uniform", "--rank-fraction", "0.5",
                                 "--data", "npz:{data}", "--overwrite"], "same as input"),
    "compress-plan-out-is-data": (COMPRESS + ["--data", "npz:{data}", "--plan-out", "{data}", "--overwrite"],
                                  "same as input"),
    "compress-existing-bases": (["compress", "{model}", "-o", "{out}", "--mode", "compact", "--data", "npz:{data}",
                                 "--plan-out", "{dir}/joint.json"], "output exists: {dir}/joint.json.bases.npz"),
    "compress-analysis-cache-under-a-file": (["compress", "{model}", "-o", "{out}", "--mode", "compact", "--data",
                                              "npz:{data}", "--calib", "10", "--val", "10", "--analysis-cache",
                                              "{existing}/cache"],
                                             "cannot make the analysis cache directory {existing}/cache"),
    "export-output-is-checkpoint": (["export", "cifar10-resnet20", "--weights", "{existing}", "-o", "{existing}",
                                     "--overwrite"], "same as input"),
    "rewrite-output-exists": (["rewrite", "{model}", "--plan", "{plan}", "-o", "{existing}"],
                              "output exists: {existing} (pass --overwrite"),
    # Option values, refused before any work.
    **{f"compress-tolerance-{name}": (JOINT + ["--tolerance", value], "--tolerance must be a finite number >= 0")
       for name, value in (("nan", "nan"), ("inf", "inf"), ("negative", "-5"))},
    "compress-target-reduction-nan": (["compress", "{model}", "-o", "{out}", "--mode", "lossless", "--data",
                                       "npz:{data}", "--target-reduction", "nan"],
                                      "--target-reduction must be a number in (0, 1)"),
    "compress-lossless-without-target": (["compress", "{model}", "-o", "{out}", "--mode", "lossless", "--data",
                                          "npz:{data}"], "mode lossless needs --target-reduction"),
    "compress-seed-negative": (JOINT + ["--seed", "-1"], "-1 is not in the range x>=0"),
    "compress-missing-data-before-export": (["compress", "cifar10-resnet20", "-o", "{out}", "--mode", "uniform",
                                             "--rank-fraction", "0.5", "--data", "npz:{dir}/missing.npz"],
                                            "data file not found: {dir}/missing.npz"),
    "bench-threads-beyond-the-cpus": (["bench", "{model}", "--reference", "{model}", "--threads", "100000"],
                                      "100000 is not in the range"),
    "bench-batch-beyond-memory": (["bench", "{model}", "--reference", "{model}", "--batch", "1000000000"],
                                  "more than half of the"),
}


def _fill(arg: str, files: dict[str, Path]) -> str:
    for key, value in files.items():
        arg = arg.replace("{" + key + "}", str(value))
    return arg


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input(case: str, files: dict[str, Path]) -> None:
    (files["dir"] / "joint.json.bases.npz").write_bytes(b"precious")
    argv, expected = CASES[case]
    before = snapshot(files["dir"])
    result = invoke(*[_fill(a, files) for a in argv])
    assert_one_line_error(result, _fill(expected, files))
    assert snapshot(files["dir"]) == before


def test_inspect_reports_nonfinite_weights(files: dict[str, Path]) -> None:
    result = invoke("inspect", files["nan"], "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["nonfinite_weights"] == ["w1"]


@pytest.mark.parametrize("command", ["compress", "rewrite"])
@pytest.mark.parametrize("failure", ["disk-full", "interrupted"])
def test_failed_write_leaves_nothing(files: dict[str, Path], command: str, failure: str,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Writing the model fails: the existing output stays as it was, no new file (plan included) appears."""
    def fail(self: Path, *args: object, **kwargs: object) -> None:
        self.open("wb").write(b"partial")  # something reached the disk before the failure
        if failure == "interrupted":
            raise KeyboardInterrupt
        raise OSError(28, "No space left on device", str(self))

    monkeypatch.setattr(Path, "write_bytes", fail)
    out, plan_out = files["existing"], files["dir"] / "new_plan.json"
    argv = (["compress", files["model"], "-o", out, "--mode", "uniform", "--rank-fraction", 0.5, "--plan-out",
             plan_out] if command == "compress" else ["rewrite", files["model"], "--plan", files["plan"], "-o", out])
    before = snapshot(files["dir"])
    result = invoke(*argv, "--overwrite")
    if failure == "interrupted":
        assert result.exit_code == 1 and result.stderr.strip().splitlines()[-1] == "Aborted!"  # click's Ctrl-C
    else:
        assert_one_line_error(result, f"cannot write {out}: No space left on device")
    assert snapshot(files["dir"]) == before


def test_overwrite_replaces_both_outputs(files: dict[str, Path]) -> None:
    out, plan_out = files["existing"], files["dir"] / "plan_again.json"
    plan_out.write_text("old plan")
    result = invoke("compress", files["model"], "-o", out, "--mode", "uniform", "--rank-fraction", 0.5,
                    "--plan-out", plan_out, "--overwrite")
    assert result.exit_code == 0, result.output
    assert onnx.load(str(out)).graph.node[0].name == "fc1/lrf_a"
    assert json.loads(plan_out.read_text())["mode"] == "uniform"
    assert not [p for p in files["dir"].iterdir() if p.name.startswith(".")]  # no staging left behind


# --- checkpoints that do not fit the model ----------------------------------------------------------

@pytest.fixture(scope="module")
def bad_checkpoints(tmp_path_factory: pytest.TempPathFactory, resnet20_weights: Path) -> dict[str, Path]:
    work = tmp_path_factory.mktemp("checkpoints")
    state = torch.load(resnet20_weights, map_location="cpu", weights_only=False)
    state = state.get("state_dict", state)
    key = next(k for k in state if k.endswith(".conv1.weight"))  # the stem conv, 16x3x3x3
    paths = {}
    for name, change in (("nan", lambda t: t.index_fill(0, torch.tensor([0]), float("nan"))),
                         ("inf", lambda t: t.index_fill(0, torch.tensor([1]), float("inf"))),
                         ("shape", lambda t: t[:, :-1])):
        changed = dict(state)
        changed[key] = change(state[key])
        paths[name] = work / f"{name}.th"
        torch.save({"state_dict": changed}, paths[name])
    return paths


@pytest.mark.parametrize("argv, expected", [
    (["export", "cifar10-resnet56", "--weights", "{r20}", "-o", "{out}"], "weights do not fit cifar10-resnet56"),
    (["compress", "cifar10-resnet56", "--weights", "{r20}", "-o", "{out}", "--mode", "uniform",
      "--rank-fraction", "0.5"], "weights do not fit cifar10-resnet56"),
    (["export", "cifar10-resnet20", "--weights", "{shape}", "-o", "{out}"],
     "weights do not fit cifar10-resnet20: conv1.weight expected (16, 3, 3, 3) got (16, 2, 3, 3)"),
    (["compress", "cifar10-resnet20", "--weights", "{nan}", "-o", "{out}", "--mode", "uniform",
      "--rank-fraction", "0.5"], "contain NaN or Inf"),
    (["export", "cifar10-resnet20", "--weights", "{inf}", "-o", "{out}"], "contain NaN or Inf"),
], ids=["export-resnet20-into-56", "compress-resnet20-into-56", "export-wrong-shape", "compress-nan",
        "export-inf"])
def test_checkpoint_does_not_fit(tmp_path: Path, resnet20_weights: Path, bad_checkpoints: dict[str, Path],
                                 argv: list[str], expected: str) -> None:
    values = {"r20": resnet20_weights, "out": tmp_path / "out.onnx", **bad_checkpoints}
    before = snapshot(tmp_path)
    result = invoke(*[_fill(a, values) for a in argv])
    assert_one_line_error(result, expected)
    assert snapshot(tmp_path) == before


def test_rewrite_never_writes_over_its_plans_bases(files: dict[str, Path]) -> None:
    from test_plan import joint_like_plan

    joint_like_plan(onnx.load(str(files["model"]))).save(files["dir"] / "joint.json")
    bases = files["dir"] / "joint.json.bases.npz"
    before = snapshot(files["dir"])
    result = invoke("rewrite", files["model"], "--plan", files["dir"] / "joint.json", "-o", bases, "--overwrite")
    assert_one_line_error(result, "same as input")
    assert snapshot(files["dir"]) == before


def test_symbolic_shape_inference_leaves_nothing_in_the_current_directory(tmp_path: Path, monkeypatch) -> None:
    """onnxruntime's symbolic shape inference writes temporary files into the current directory and can leave
    them there when it fails; onnxlrf runs it in a directory of its own."""
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    from onnxlrf.runtime import shapes

    def leaves_files(model, **kwargs):
        Path("sym_shape_infer_temp.onnx").write_bytes(b"temporary")
        raise RuntimeError("cannot finish")

    monkeypatch.setattr(SymbolicShapeInference, "infer_shapes", staticmethod(leaves_files))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sym_shape_infer_temp.onnx").write_bytes(b"the user's own file")
    with pytest.raises(RuntimeError, match="cannot finish"):
        shapes._symbolic_inference(mlp())
    assert [p.name for p in tmp_path.iterdir()] == ["sym_shape_infer_temp.onnx"]
    assert (tmp_path / "sym_shape_infer_temp.onnx").read_bytes() == b"the user's own file"


@pytest.mark.parametrize("spoil, expected", [
    (lambda d: (d / "a-file").write_bytes(b"x"), "lies below {dir}/a-file, which is not a directory"),
    (lambda d: (d / "a-file" / "report.html").mkdir(parents=True), "must be a regular file, got a directory"),
], ids=["report-below-a-file", "report-html-a-directory"])
def test_a_report_that_cannot_be_written_stops_the_run_before_anything_is_written(files: dict[str, Path], spoil,
                                                                                   expected: str) -> None:
    spoil(files["dir"])
    before = snapshot(files["dir"])
    result = invoke(*[_fill(a, files) for a in COMPRESS], "--plan-out", files["dir"] / "p.json", "--report",
                    files["dir"] / "a-file" / "report" if "below" in expected else files["dir"] / "a-file",
                    "--overwrite")
    assert_one_line_error(result, _fill(expected, files))
    assert snapshot(files["dir"]) == before


def _retyped(model: onnx.ModelProto, batch: int | str) -> onnx.ModelProto:
    """``model`` with its input's batch dimension set to ``batch`` (a number, or a symbolic name)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    dim = out.graph.input[0].type.tensor_type.shape.dim[0]
    if isinstance(batch, int):
        dim.dim_value = batch
    else:
        dim.dim_param = batch
    return out


def test_models_onnxruntime_loads_but_cannot_run(files: dict[str, Path]) -> None:
    from onnx import helper, numpy_helper

    model = mlp()
    model.graph.initializer.append(numpy_helper.from_array(np.array([7, -1], dtype=np.int64), "odd_shape"))
    reshape = helper.make_node("Reshape", [model.graph.input[0].name, "odd_shape"], ["odd"], name="odd_reshape")
    model.graph.node.insert(0, reshape)
    model.graph.node[1].input[0] = "odd"  # 40 x 24 values do not fill rows of 7
    del model.graph.value_info[:]
    broken = files["dir"] / "broken.onnx"
    onnx.save(model, str(broken))
    before = snapshot(files["dir"])
    for argv in (["validate", broken, "--data", f"npz:{files['data']}"],
                 ["compress", broken, "-o", files["out"], "--mode", "uniform", "--rank-fraction", "0.5",
                  "--data", f"npz:{files['data']}"],
                 ["bench", broken, "--reference", files["model"], "--batch", "4"]):
        assert_one_line_error(invoke(*argv), "onnxruntime cannot run the model")
        assert "odd_reshape" in invoke(*argv).stderr
    assert snapshot(files["dir"]) == before


def test_bench_against_a_reference_with_other_inputs(files: dict[str, Path]) -> None:
    static = files["dir"] / "static.onnx"
    onnx.save(_retyped(mlp(), 1), str(static))
    result = invoke("bench", files["model"], "--reference", static, "--batch", "4")
    assert_one_line_error(result, "of the reference has shape [1, 24], but the inputs are [4, 24]")
    half = files["dir"] / "half.onnx"
    model = mlp()
    model.graph.input[0].type.tensor_type.elem_type = onnx.TensorProto.FLOAT16
    onnx.save(model, str(half))
    assert invoke("bench", files["model"], "--reference", half).exit_code == 1


def test_joint_modes_refuse_weights_that_are_not_float32(files: dict[str, Path]) -> None:
    from onnx import numpy_helper

    model = mlp()
    for init in model.graph.initializer:
        init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float64), init.name))
    for value in (*model.graph.input, *model.graph.output):
        value.type.tensor_type.elem_type = onnx.TensorProto.DOUBLE
    double = files["dir"] / "double.onnx"
    onnx.save(model, str(double))
    with np.load(files["data"]) as data:
        np.savez(files["dir"] / "double.npz", x=data["x"].astype(np.float64), labels=data["labels"])
    before = snapshot(files["dir"])
    result = invoke("compress", double, "-o", files["out"], "--mode", "compact", "--data",
                    f"npz:{files['dir'] / 'double.npz'}", "--calib", "10", "--val", "10")
    assert_one_line_error(result, "the joint modes analyse float32 models; weight 'w1' is float64")
    assert snapshot(files["dir"]) == before


def test_tiny_splits_are_warned_about(files: dict[str, Path]) -> None:
    result = invoke("compress", files["model"], "-o", files["out"], "--mode", "compact", "--data",
                    f"npz:{files['data']}", "--calib", "1", "--val", "1")
    assert result.exit_code == 0, result.output
    assert "warning: 1 samples cannot tell a compressed model from the original" in result.stderr


def test_an_output_that_fails_the_checker_is_never_written(files: dict[str, Path], monkeypatch) -> None:
    def failing(*args, **kwargs):
        raise onnx.checker.ValidationError("Nodes in a graph must be topologically sorted")

    monkeypatch.setattr(onnx.checker, "check_model", failing)
    before = snapshot(files["dir"])
    assert_one_line_error(invoke(*[_fill(a, files) for a in COMPRESS]), "fails the ONNX checker (Nodes in a graph")
    assert_one_line_error(invoke("rewrite", files["model"], "--plan", files["plan"], "-o", files["out"]),
                          "nothing was written")
    assert snapshot(files["dir"]) == before


def test_data_for_a_model_without_inputs(files: dict[str, Path]) -> None:
    from onnx import TensorProto, helper, numpy_helper

    weight = np.ones((8, 8), np.float32)
    graph = helper.make_graph([helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(weight[:1], "v")),
                               helper.make_node("MatMul", ["c", "w"], ["y"], name="mm")], "no_inputs", [],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])],
                              [numpy_helper.from_array(weight, "w")])
    path = files["dir"] / "no_inputs.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))
    before = snapshot(files["dir"])
    assert_one_line_error(invoke("validate", path, "--data", f"npz:{files['data']}"), "the model has no inputs")
    assert snapshot(files["dir"]) == before


def test_a_graph_that_reads_a_value_nothing_produces(files: dict[str, Path]) -> None:
    model = mlp()
    model.graph.node[-1].input[0] = "nowhere"
    path = files["dir"] / "dangling.onnx"
    onnx.save(model, str(path))
    before = snapshot(files["dir"])
    for argv in (["rewrite", path, "--plan", files["plan"], "-o", files["out"]], ["inspect", path],
                 ["compress", path, "-o", files["out"], "--mode", "uniform", "--rank-fraction", "0.5"]):
        assert_one_line_error(invoke(*argv), "reads 'nowhere', which no graph input, initializer or earlier node")
    assert snapshot(files["dir"]) == before
