"""cli: every command end to end on the real ResNet-20, JSON output, and one-line errors that leave files alone.

The ResNet-20 is exported once per module; validation data is a 500-image
class-balanced subset of the shared CIFAR-10 test set to keep the run short.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner, Result

from onnxlrf.cli import cli
from onnxlrf.data import IMAGE_MEAN, IMAGE_STD
from onnxlrf.graph.layers import count_params
from onnxlrf.onnx_io import load_onnx
from onnxlrf.planning.plan import Plan, validate_plan

PER_CLASS = 50
COMPRESS_KEYS = {"params", "reference_params", "params_reduction", "metric", "value", "reference_value",
                 "max_abs_diff", "providers"}
VALIDATE_KEYS = {"metric", "value", "reference_value", "params", "reference_params", "max_abs_diff", "providers",
                 "change_interval"}
BENCH_KEYS = {"latency_ms", "reference_latency_ms", "speedup", "flops", "reference_flops", "providers"}


def invoke(*args: object) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args])


def invoke_ok(*args: object) -> Result:
    result = invoke(*args)
    assert result.exit_code == 0, result.stderr
    return result


def invoke_json(*args: object) -> dict:
    result = invoke_ok(*args, "--json")
    payload = json.loads(result.stdout)
    assert isinstance(payload, dict)
    return payload


def snapshot(directory: Path) -> dict[str, str]:
    """Every file under ``directory`` (hidden temporaries included) with its content hash."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def balanced_subset(cifar_npz: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(cifar_npz) as npz:
        images, labels = npz["images"], npz["labels"]
    idx = np.concatenate([np.flatnonzero(labels == c)[:PER_CLASS] for c in range(10)])
    return images[idx], labels[idx]


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module")
def subset(work: Path, cifar_npz: Path) -> dict[str, Path]:
    """The same 500 images as npz:PATH (normalized, named after the graph input) and as cifar10-jpeg:PATH."""
    images, labels = balanced_subset(cifar_npz)
    pixels = (images.astype(np.float32) / 255.0 - IMAGE_MEAN) / IMAGE_STD
    npz = work / "subset.npz"
    np.savez(npz, input=np.ascontiguousarray(pixels.transpose(0, 3, 1, 2), dtype=np.float32),
             labels=labels.astype(np.int64))
    jpeg = work / "subset_jpeg.npz"
    np.savez(jpeg, images=images, labels=labels)
    return {"npz": npz, "jpeg": jpeg}


@pytest.fixture(scope="module")
def exported(work: Path, resnet20_weights: Path) -> tuple[Path, dict]:
    out = work / "r20.onnx"
    return out, invoke_json("export", "cifar10-resnet20", "--weights", resnet20_weights, "-o", out,
                            "--dynamic-batch")


@pytest.fixture(scope="module")
def resnet20(exported: tuple[Path, dict]) -> Path:
    return exported[0]


@pytest.fixture(scope="module")
def compressed(work: Path, resnet20: Path, subset: dict[str, Path]) -> dict:
    out, plan = work / "r20_uniform.onnx", work / "r20_uniform.plan.json"
    payload = invoke_json("compress", resnet20, "-o", out, "--mode", "uniform", "--target-reduction", 0.5,
                          "--data", f"npz:{subset['npz']}", "--plan-out", plan)
    return {"output": out, "plan": plan, "payload": payload}


def _input_dims(path: Path) -> list:
    model = onnx.load(str(path), load_external_data=False)
    return [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]


def _run(path: Path, x: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x})[0]


# --- export ---------------------------------------------------------------------------------------

def test_export_torchscript_dynamic_batch(exported: tuple[Path, dict]) -> None:
    path, payload = exported
    assert payload["exporter"] == "torchscript" and payload["opset"] == 17
    assert 0 <= payload["max_abs_diff"] <= payload["tolerance"]
    assert payload["providers"] and payload["external_data"] is False
    assert Path(payload["path"]) == path and sorted(p.name for p in path.parent.glob("r20.onnx*")) == ["r20.onnx"]
    dims = _input_dims(path)
    assert isinstance(dims[0], str) and dims[1:] == [3, 32, 32]
    x = np.random.default_rng(0).standard_normal((3, 3, 32, 32)).astype(np.float32)
    assert _run(path, x).shape == (3, 10)


def test_export_dynamo_dynamic_batch(tmp_path: Path, resnet20_weights: Path) -> None:
    out = tmp_path / "r20.onnx"
    payload = invoke_json("export", "cifar10-resnet20", "--weights", resnet20_weights, "-o", out,
                          "--dynamic-batch", "--dynamo")
    assert payload["exporter"] == "dynamo" and payload["opset"] == 18 and payload["external_data"] is True
    assert 0 <= payload["max_abs_diff"] <= payload["tolerance"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r20.onnx", "r20.onnx.data"]
    assert isinstance(_input_dims(out)[0], str)
    assert _run(out, np.zeros((2, 3, 32, 32), np.float32)).shape == (2, 10)


# --- compress --------------------------------------------------------------------------------------

def _check_compress_payload(payload: dict, target: float, samples: int) -> None:
    assert COMPRESS_KEYS <= payload.keys()
    assert 0 < payload["params"] < payload["reference_params"]
    assert payload["params_reduction"] == pytest.approx(1 - payload["params"] / payload["reference_params"])
    # The planners remove at least the target share of the whole model's parameters.
    assert target <= payload["params_reduction"] < target + 0.1
    assert payload["metric"] == "top1" and payload["samples"] == samples
    assert 0 <= payload["value"] <= 1 and payload["reference_value"] > 0.6  # ResNet-20 is ~80% here
    assert payload["max_abs_diff"] > 0
    assert "CPUExecutionProvider" in payload["providers"]


def test_compress_uniform_onnx(compressed: dict, resnet20: Path) -> None:
    payload = compressed["payload"]
    _check_compress_payload(payload, 0.5, 10 * PER_CLASS)
    assert payload["mode"] == "uniform"
    model = load_onnx(compressed["output"])
    onnx.checker.check_model(model)
    assert count_params(model) == payload["params"]
    plan = Plan.load(compressed["plan"])
    assert plan.mode == "uniform" and plan.options["target_reduction"] == 0.5
    validate_plan(plan, load_onnx(resnet20))
    assert sum(layer.decomposition != "dense" for layer in plan.layers) == payload["layers_factorized"]


def test_compress_energy_onnx(tmp_path: Path, resnet20: Path, subset: dict[str, Path]) -> None:
    out, plan = tmp_path / "e.onnx", tmp_path / "e.json"
    payload = invoke_json("compress", resnet20, "-o", out, "--mode", "energy", "--target-reduction", 0.3,
                          "--data", f"npz:{subset['npz']}", "--plan-out", plan)
    _check_compress_payload(payload, 0.3, 10 * PER_CLASS)
    assert Plan.load(plan).mode == "energy" and count_params(load_onnx(out)) == payload["params"]


def test_compress_model_name(tmp_path: Path, resnet20_weights: Path, subset: dict[str, Path],
                             compressed: dict) -> None:
    """A model name is exported on the fly; cifar10-jpeg data is the same images as the npz subset."""
    out, plan = tmp_path / "e.onnx", tmp_path / "e.json"
    payload = invoke_json("compress", "cifar10-resnet20", "--weights", resnet20_weights, "-o", out,
                          "--mode", "energy", "--target-reduction", 0.3,
                          "--data", f"cifar10-jpeg:{subset['jpeg']}", "--plan-out", plan)
    _check_compress_payload(payload, 0.3, 10 * PER_CLASS)
    # Same network, same images: the reference scores as the exported ONNX file did (one image of slack).
    assert payload["reference_value"] == pytest.approx(compressed["payload"]["reference_value"], abs=1 / 500)
    assert payload["reference_params"] == compressed["payload"]["reference_params"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.json", "e.onnx"]


# --- rewrite ---------------------------------------------------------------------------------------

def test_compress_reuses_the_cached_analysis_for_another_target(tmp_path: Path, resnet20: Path,
                                                                 subset: dict[str, Path]) -> None:
    cache = tmp_path / "analyses"
    common = ("--mode", "lossless", "--data", f"npz:{subset['npz']}", "--calib", 100, "--val", 100,
              "--no-refit", "--analysis-cache", cache)
    first = invoke_ok("compress", resnet20, "-o", tmp_path / "a.onnx", "--target-reduction", 0.05, *common)
    assert "analysis: saved to the cache" in first.stderr and "perturbation ranges" in first.stderr
    (saved,) = cache.iterdir()
    second = invoke_ok("compress", resnet20, "-o", tmp_path / "b.onnx", "--target-reduction", 0.1,
                       "--plan-out", tmp_path / "b.json", *common)
    assert f"analysis: read from the cache, {saved}" in second.stderr
    assert "perturbation ranges" not in second.stderr  # nothing was measured again
    assert list(cache.iterdir()) == [saved]
    plan = Plan.load(tmp_path / "b.json")
    assert plan.mode == "lossless" and plan.options["target_reduction"] == 0.1
    assert plan.options["achieved_reduction"] >= 0.1


def test_rewrite_with_compress_plan(tmp_path: Path, resnet20: Path, compressed: dict) -> None:
    out = tmp_path / "rw.onnx"
    report = invoke_json("rewrite", resnet20, "--plan", compressed["plan"], "-o", out)
    assert report["params_after"] == compressed["payload"]["params"]
    assert len(report["rewritten"]) == compressed["payload"]["layers_factorized"]
    x = np.random.default_rng(1).standard_normal((4, 3, 32, 32)).astype(np.float32)
    np.testing.assert_allclose(_run(out, x), _run(compressed["output"], x), rtol=0, atol=1e-5)


def test_rewrite_user_edited_smaller_rank(tmp_path: Path, resnet20: Path, compressed: dict) -> None:
    data = json.loads(compressed["plan"].read_text())
    entry = next(e for e in data["layers"] if e["choice"]["decomposition"] == "channel" and e["choice"]["rank"] > 1)
    entry["choice"]["rank"] -= 1
    edited = tmp_path / "edited.json"
    edited.write_text(json.dumps(data))
    report = invoke_json("rewrite", resnet20, "--plan", edited, "-o", tmp_path / "rw.onnx")
    rewritten = {r["node"]: r for r in report["rewritten"]}
    assert rewritten[entry["node"]]["rank"] == entry["choice"]["rank"]
    # One rank fewer on one layer: m + n parameters fewer (per group) than the compress output.
    saved = compressed["payload"]["params"] - report["params_after"]
    cout, cin = entry["weight_shape"][:2]
    kernel = int(np.prod(entry["weight_shape"][2:]))
    assert saved == cout + cin * kernel


def _edited_plan(path: Path, source: Path, edit) -> Path:
    data = json.loads(source.read_text())
    edit(data["layers"])
    path.write_text(json.dumps(data))
    return path


def _rename_first(layers: list) -> None:
    layers[0]["node"] = "/no/such/Conv"


def _rank_too_large(layers: list) -> None:
    layers[1]["choice"]["rank"] = layers[1]["choice"]["max_rank"] + 1


@pytest.mark.parametrize("edit, expected", [(_rename_first, "/no/such/Conv"), (_rank_too_large, "rank")],
                         ids=["missing-node", "rank-too-large"])
def test_rewrite_bad_plan(tmp_path: Path, resnet20: Path, compressed: dict, edit, expected: str) -> None:
    plan = _edited_plan(tmp_path / "bad.json", compressed["plan"], edit)
    before = snapshot(tmp_path)
    result = invoke("rewrite", resnet20, "--plan", plan, "-o", tmp_path / "rw.onnx")
    assert_one_line_error(result, expected)
    assert snapshot(tmp_path) == before


# --- validate / bench ------------------------------------------------------------------------------

def test_validate_json(resnet20: Path, compressed: dict, subset: dict[str, Path]) -> None:
    payload = invoke_json("validate", compressed["output"], "--reference", resnet20,
                          "--data", f"npz:{subset['npz']}", "--batch-size", 100)
    assert VALIDATE_KEYS <= payload.keys()
    expected = compressed["payload"]
    for key in ("value", "reference_value", "params", "reference_params"):
        assert payload[key] == pytest.approx(expected[key], abs=1e-9), key
    assert payload["max_abs_diff"] == pytest.approx(expected["max_abs_diff"], rel=1e-4)
    assert payload["samples"] == 10 * PER_CLASS and "CPUExecutionProvider" in payload["providers"]
    assert payload["change_interval"] == pytest.approx(expected["change_interval"], abs=1e-9)


def test_validate_against_itself(resnet20: Path, subset: dict[str, Path]) -> None:
    payload = invoke_json("validate", resnet20, "--reference", resnet20, "--data", f"npz:{subset['npz']}")
    assert payload["value"] == payload["reference_value"] and payload["max_abs_diff"] == 0
    assert payload["params"] == payload["reference_params"] and payload["change_interval"] == [0, 0]


def test_bench_json(resnet20: Path, compressed: dict) -> None:
    payload = invoke_json("bench", compressed["output"], "--reference", resnet20, "--runs", 3, "--warmup", 1)
    assert BENCH_KEYS <= payload.keys()
    assert payload["latency_ms"] > 0 and payload["reference_latency_ms"] > 0
    assert payload["speedup"] == pytest.approx(payload["reference_latency_ms"] / payload["latency_ms"])
    assert 0 < payload["flops"] < payload["reference_flops"]
    assert payload["runs"] == 3 and payload["batch"] == 1 and payload["providers"]


# --- the installed console script ------------------------------------------------------------------

def test_console_script_json_and_exit_codes(tmp_path: Path, resnet20: Path, subset: dict[str, Path]) -> None:
    script = Path(sys.executable).with_name("onnxlrf")
    ok = subprocess.run([str(script), "validate", str(resnet20), "--data", f"npz:{subset['npz']}", "--json"],
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.endswith("\n") and ok.stdout.count("\n") == 1  # one line: the JSON object, nothing else
    assert VALIDATE_KEYS - {"reference_value", "reference_params", "max_abs_diff"} <= json.loads(ok.stdout).keys()
    bad = subprocess.run([str(script), "validate", str(tmp_path / "missing.onnx"), "--data",
                          f"npz:{subset['npz']}", "--json"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and bad.stdout == ""
    assert bad.stderr.count("\n") == 1 and "missing.onnx" in bad.stderr


# --- errors: one line, non-zero exit, files untouched ----------------------------------------------

def assert_one_line_error(result: Result, expected: str) -> None:
    assert result.exit_code != 0
    assert isinstance(result.exception, SystemExit), result.exception  # no traceback
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: ") and expected in lines[0], lines[0]
    assert result.stdout == ""


@pytest.fixture(scope="module")
def bad_inputs(work: Path, resnet20: Path) -> dict[str, Path]:
    """Broken files and data, shared by the error cases."""
    bad = work / "bad"
    bad.mkdir()
    (bad / "random.onnx").write_bytes(np.random.default_rng(0).bytes(4096))
    (bad / "truncated.onnx").write_bytes(resnet20.read_bytes()[:5000])
    np.savez(bad / "big.npz", input=np.zeros((8, 3, 64, 64), np.float32), labels=np.zeros(8, np.int64))
    np.savez(bad / "big_jpeg.npz", images=np.zeros((8, 64, 64, 3), np.uint8), labels=np.zeros(8, np.uint8))
    return {p.stem: p for p in bad.iterdir()}


ERROR_CASES = {
    # id: (argv with {model}/{out}/{plan}/{bad:...}/{data} placeholders, expected text in the message)
    "validate-missing-file": (["validate", "{out}", "--data", "npz:{data}"], "file not found"),
    "compress-missing-file": (["compress", "{dir}/missing.onnx", "-o", "{out}", "--mode", "uniform",
                               "--rank-fraction", "0.5"], "missing.onnx"),
    "rewrite-not-onnx": (["rewrite", "{bad:random}", "--plan", "{plan}", "-o", "{out}"], "not a valid ONNX"),
    "validate-not-onnx": (["validate", "{bad:random}", "--data", "npz:{data}"], "not a valid ONNX"),
    "compress-truncated": (["compress", "{bad:truncated}", "-o", "{out}", "--mode", "uniform",
                            "--rank-fraction", "0.5"], "truncated.onnx"),
    "bench-truncated": (["bench", "{bad:truncated}", "--reference", "{model}", "--runs", "1"], "truncated.onnx"),
    "validate-data-misfit": (["validate", "{model}", "--data", "npz:{bad:big}"], "'input'"),
    "compress-data-misfit": (["compress", "{model}", "-o", "{out}", "--mode", "uniform", "--rank-fraction", "0.5",
                              "--data", "cifar10-jpeg:{bad:big_jpeg}"], "'input'"),
    "compress-unknown-model": (["compress", "cifar10-resnet7", "-o", "{out}", "--mode", "uniform",
                                "--rank-fraction", "0.5"], "unknown model 'cifar10-resnet7'"),
    "export-unknown-model": (["export", "nosuchnet", "-o", "{out}"], "unknown model 'nosuchnet'"),
    "rewrite-output-is-input": (["rewrite", "{model}", "--plan", "{plan}", "-o", "{model}"], "same as input"),
    "compress-output-is-input": (["compress", "{model}", "-o", "{model}", "--mode", "uniform",
                                  "--rank-fraction", "0.5", "--overwrite"], "same as input"),
    "rewrite-output-exists": (["rewrite", "{model}", "--plan", "{plan}", "-o", "{existing}"], "--overwrite"),
    "compress-output-exists": (["compress", "{model}", "-o", "{existing}", "--mode", "uniform",
                                "--rank-fraction", "0.5"], "--overwrite"),
    "compress-plan-out-exists": (["compress", "{model}", "-o", "{out}", "--mode", "uniform",
                                  "--rank-fraction", "0.5", "--plan-out", "{existing}"], "--overwrite"),
    "export-output-exists": (["export", "cifar10-resnet20", "--weights", "{weights}", "-o", "{existing}"],
                             "--overwrite"),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_errors(case: str, tmp_path: Path, resnet20: Path, compressed: dict, bad_inputs: dict[str, Path],
                subset: dict[str, Path], resnet20_weights: Path) -> None:
    argv, expected = ERROR_CASES[case]
    # The case works in its own directory: a copy of the model and an unrelated existing file.
    model = tmp_path / "model.onnx"
    model.write_bytes(resnet20.read_bytes())
    existing = tmp_path / "existing.onnx"
    existing.write_bytes(b"precious")
    values = {"model": model, "out": tmp_path / "out.onnx", "plan": compressed["plan"], "dir": tmp_path,
              "data": subset["npz"], "existing": existing, "weights": resnet20_weights,
              **{f"bad:{k}": v for k, v in bad_inputs.items()}}
    args = [_fill(a, values) for a in argv]
    before = snapshot(tmp_path)
    result = invoke(*args)
    assert_one_line_error(result, expected)
    assert snapshot(tmp_path) == before


def _fill(arg: str, values: dict) -> str:
    for key, value in values.items():
        arg = arg.replace("{" + key + "}", str(value))
    return arg


def test_compress_defaults_are_the_library_defaults() -> None:
    """The CLI's defaults for the back-off are the library's (what a Python user gets) and the README's."""
    from onnxlrf.cli import DEFAULT_ACCEPTANCE_Z, _acceptance_z
    from onnxlrf.verify.backoff import VerifyOptions
    from onnxlrf.verify.search import DEFAULT_ACCEPTANCE

    assert float(DEFAULT_ACCEPTANCE_Z) == DEFAULT_ACCEPTANCE.loss_z == VerifyOptions().acceptance_z
    assert _acceptance_z(None, None, "off") is None and _acceptance_z(None, None, "1.5") == 1.5
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert f"--acceptance-z Z\\|off` | compact: default {DEFAULT_ACCEPTANCE_Z}." in readme
    result = invoke("compress", "x.onnx", "--mode", "compact", "-o", "y.onnx", "--acceptance-z", "often")
    assert result.exit_code != 0 and "expected a number or 'off'" in result.output
