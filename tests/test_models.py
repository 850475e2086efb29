"""models: every family loads, real weights give real accuracy, bad weights give one-line errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from onnxlrf.models import ModelSpec, cifar_resnet, list_models, load_model

from onnxlrf.errors import OnnxlrfError

MEAN = torch.tensor(cifar_resnet.MEAN).view(1, 3, 1, 1)
STD = torch.tensor(cifar_resnet.STD).view(1, 3, 1, 1)


def _check_classifier(spec: ModelSpec, name: str, size: int, classes: int) -> None:
    assert spec.name == name
    assert not spec.module.training
    assert list(spec.example_inputs) == ["input"]
    example = spec.example_inputs["input"]
    assert example.dtype == torch.float32 and tuple(example.shape) == (1, 3, size, size)
    assert spec.output_names == ["logits"]
    assert spec.dynamic_axes["input"] == {0: "batch"}
    assert spec.task == "classification"
    assert spec.metadata == {"onnxlrf.model": name, "onnxlrf.task": "classification"}
    with torch.no_grad():
        logits = spec.module(*spec.example_inputs.values())
    assert tuple(logits.shape) == (1, classes) and torch.isfinite(logits).all()


def test_list_models_names_every_family() -> None:
    names = list_models()
    for name in ("cifar10-resnet20", "cifar10-resnet32", "cifar10-resnet44", "cifar10-resnet56", "minilm"):
        assert name in names
    assert any(n.startswith("torchvision:") for n in names) and any(n.startswith("hf:") for n in names)


def test_cifar_resnet20_with_weights_argument(resnet20_weights: Path) -> None:
    spec = load_model("cifar10-resnet20", weights=str(resnet20_weights))
    _check_classifier(spec, "cifar10-resnet20", 32, 10)
    convs = [m for m in spec.module.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 19 and all(c.bias is None for c in convs)
    checkpoint = torch.load(resnet20_weights, map_location="cpu", weights_only=False)["state_dict"]
    assert torch.equal(spec.module.linear.weight, checkpoint["module.linear.weight"])


def test_cifar_resnet_from_cache_dir(resnet20_weights: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ONNXLRF_CACHE", str(resnet20_weights.parent))
    spec = load_model("cifar10-resnet20")
    checkpoint = torch.load(resnet20_weights, map_location="cpu", weights_only=False)["state_dict"]
    assert torch.equal(spec.module.conv1.weight, checkpoint["module.conv1.weight"])


def test_cifar_resnet_downloads_published_file_into_cache(
    resnet20_weights: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ONNXLRF_CACHE", str(tmp_path / "cache"))
    urls = []

    def fake_download(url: str, dst: str, progress: bool = True) -> None:
        urls.append(url)
        shutil.copy(resnet20_weights, dst)

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    load_model("cifar10-resnet20")
    assert urls == [
        "https://github.com/akamaster/pytorch_resnet_cifar10/raw/master/pretrained_models/resnet20-12fca82f.th"
    ]
    assert (tmp_path / "cache" / "resnet20-12fca82f.th").is_file()


def test_failed_download_says_what_to_do(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ONNXLRF_CACHE", str(tmp_path))

    def no_network(url: str, dst: str, progress: bool = True) -> None:
        raise OSError("network unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    with pytest.raises(OnnxlrfError, match=r"--weights.*ONNXLRF_CACHE") as info:
        load_model("cifar10-resnet32")
    assert "\n" not in str(info.value) and "resnet32-d509ac18.th" in str(info.value)


@pytest.mark.parametrize("name", ["cifar10-resnet32", "cifar10-resnet44", "cifar10-resnet56"])
def test_cifar_resnet_depths(name: str, tmp_path: Path) -> None:
    depth = int(name.removeprefix("cifar10-resnet"))
    reference = cifar_resnet.CifarResNet(depth)
    path = tmp_path / "w.th"
    torch.save({"state_dict": {f"module.{k}": v for k, v in reference.state_dict().items()}}, path)
    spec = load_model(name, weights=str(path))
    convs = [m for m in spec.module.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == depth - 1


def test_resnet20_weights_do_not_fit_resnet56(resnet20_weights: Path) -> None:
    with pytest.raises(OnnxlrfError, match=r"^weights do not fit cifar10-resnet56: missing layer1\.3"):
        load_model("cifar10-resnet56", weights=str(resnet20_weights))


def test_wrong_shape_names_parameter(resnet20_weights: Path, tmp_path: Path) -> None:
    checkpoint = torch.load(resnet20_weights, map_location="cpu", weights_only=False)
    checkpoint["state_dict"]["module.linear.weight"] = torch.zeros(100, 64)
    path = tmp_path / "bad.th"
    torch.save(checkpoint, path)
    with pytest.raises(OnnxlrfError, match=r"linear\.weight expected \(10, 64\) got \(100, 64\)"):
        load_model("cifar10-resnet20", weights=str(path))


def test_nan_weights_name_parameter(resnet20_weights: Path, tmp_path: Path) -> None:
    checkpoint = torch.load(resnet20_weights, map_location="cpu", weights_only=False)
    checkpoint["state_dict"]["module.layer2.1.conv1.weight"][0, 0, 0, 0] = float("nan")
    path = tmp_path / "nan.th"
    torch.save(checkpoint, path)
    with pytest.raises(OnnxlrfError, match=r"NaN or Inf in layer2\.1\.conv1\.weight"):
        load_model("cifar10-resnet20", weights=str(path))


def test_missing_weights_file(tmp_path: Path) -> None:
    with pytest.raises(OnnxlrfError, match="weights file not found"):
        load_model("cifar10-resnet20", weights=str(tmp_path / "nope.th"))


def test_unknown_model_lists_known() -> None:
    with pytest.raises(OnnxlrfError, match=r"^unknown model 'resnet9000'; known: cifar10-resnet20"):
        load_model("resnet9000")
    with pytest.raises(OnnxlrfError, match=r"unknown model 'torchvision:nope'; known torchvision models include: "):
        load_model("torchvision:nope")


def test_torchvision_resnet18_random_and_loaded(tmp_path: Path) -> None:
    spec = load_model("torchvision:resnet18")
    _check_classifier(spec, "torchvision:resnet18", 224, 1000)
    state = {k: torch.full_like(v, 0.5) if v.is_floating_point() else v for k, v in spec.module.state_dict().items()}
    torch.save(state, tmp_path / "r18.pt")
    loaded = load_model("torchvision:resnet18", weights=str(tmp_path / "r18.pt"))
    assert torch.equal(loaded.module.fc.weight, torch.full((1000, 512), 0.5))


def test_torchvision_random_detector_is_seeded_with_batchnorm_statistics() -> None:
    """The same name is the same model; a detector's BatchNorms hold statistics of data (not 0 and 1),
    so its scores do not all tie."""
    first, second = (load_model("torchvision:ssdlite320_mobilenet_v3_large") for _ in range(2))
    state = first.module.state_dict()
    assert all(torch.equal(value, second.module.state_dict()[key]) for key, value in state.items())
    variances = [value for key, value in state.items() if key.endswith("running_var")]
    assert variances and not any(torch.all(value == 1) for value in variances)
    with torch.no_grad():
        scores = first.module(*first.example_inputs.values())[1]
    assert float(scores.std()) > 1e-3


@pytest.fixture(scope="module")
def minilm() -> ModelSpec:
    return load_model("minilm")


def _check_encoder(spec: ModelSpec) -> None:
    assert list(spec.example_inputs) == ["input_ids", "attention_mask"]
    assert all(t.dtype == torch.int64 for t in spec.example_inputs.values())
    mask = spec.example_inputs["attention_mask"]
    assert (mask[0] == 0).any(), "the first example row is padded, so any batch covers masking"
    assert spec.output_names == ["sentence_embedding"]
    assert spec.dynamic_axes["input_ids"] == {0: "batch", 1: "sequence"}
    assert spec.task == "sentence-similarity"


def test_minilm_mean_pooling(minilm: ModelSpec) -> None:
    _check_encoder(minilm)
    assert minilm.metadata["onnxlrf.tokenizer"] == "minilm"
    ids, mask = minilm.example_inputs.values()
    with torch.no_grad():
        emb = minilm.module(ids, mask)
        hidden = minilm.module.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
    assert tuple(emb.shape) == (2, 384)
    n = int(mask[0].sum())
    torch.testing.assert_close(emb[0], hidden[0, :n].mean(0))
    assert not torch.allclose(emb.norm(dim=1), torch.ones(2)), "embeddings are not L2-normalized"
    linears = [m for m in minilm.module.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 36 + 1  # 6 layers x (q, k, v, out, up, down) + the unused pooler


def test_hf_directory(minilm: ModelSpec, tmp_path: Path) -> None:
    from onnxlrf.models.text import minilm_dir

    spec = load_model(f"hf:{minilm_dir()}")
    _check_encoder(spec)
    assert spec.metadata["onnxlrf.tokenizer"] == str(minilm_dir().resolve())
    with pytest.raises(OnnxlrfError, match="no config.json"):
        load_model(f"hf:{tmp_path}")
    with pytest.raises(OnnxlrfError, match="--weights does not apply"):
        load_model("minilm", weights="x.th")


def _resnet20_accuracy(weights: Path, npz: Path, rows: np.ndarray) -> float:
    data = np.load(npz)
    images = torch.from_numpy(data["images"][rows]).permute(0, 3, 1, 2).float() / 255
    labels = torch.from_numpy(data["labels"][rows].astype(np.int64))
    spec = load_model("cifar10-resnet20", weights=str(weights))
    with torch.no_grad():
        predicted = torch.cat([spec.module((chunk - MEAN) / STD).argmax(1) for chunk in images.split(1000)])
    return (predicted == labels).float().mean().item()


def test_resnet20_accuracy_on_real_images(resnet20_weights: Path, cifar_npz: Path) -> None:
    # The file is sorted by class (its first 500 images are all airplanes), so take 50 of each class.
    labels = np.load(cifar_npz)["labels"]
    rows = np.concatenate([np.flatnonzero(labels == c)[:50] for c in range(10)])
    assert _resnet20_accuracy(resnet20_weights, cifar_npz, rows) > 0.75  # reference: 81.03% on all 10,000


@pytest.mark.slow
def test_resnet20_reference_accuracy_on_all_images(resnet20_weights: Path, cifar_npz: Path) -> None:
    accuracy = _resnet20_accuracy(resnet20_weights, cifar_npz, np.arange(10_000))
    assert accuracy == pytest.approx(0.8103, abs=1e-4)
