"""torchvision models (``torchvision:<name>``): classification, segmentation and detection."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from onnxlrf.errors import OnnxlrfError

from .cifar_resnet import read_state_dict

CLASSIFICATION, SEGMENTATION, DETECTION = "classification", "segmentation", "detection"


class SegmentationMap(nn.Module):
    """A torchvision segmentation model's ``out`` map (its forward returns a dict, which ONNX cannot)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)["out"]


class FirstImageDetections(nn.Module):
    """A torchvision detection model on a one-image batch: that image's boxes, scores and labels.

    The model takes a list of images and returns a list of dicts; exported, the outputs have one
    row per detection (a number that varies with the image) and no batch axis.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        detections = self.model(list(images))[0]
        return detections["boxes"], detections["scores"], detections["labels"]


def build(name: str, weights: str | os.PathLike | None) -> tuple[nn.Module, tuple[int, int], str]:
    """The model (random weights unless a state_dict file is given), its usual input size and its task."""
    try:
        from torchvision import models
    except ImportError:
        raise OnnxlrfError("torchvision models need torchvision: pip install onnxlrf[vision]") from None
    from . import load_state_dict_checked

    tasks = {CLASSIFICATION: models, SEGMENTATION: models.segmentation, DETECTION: models.detection}
    task = next((task for task, module in tasks.items() if name in models.list_models(module=module)), None)
    if task is None:
        known = models.list_models(module=models)
        raise OnnxlrfError(f"unknown model 'torchvision:{name}'; known torchvision models include: "
                           f"{', '.join(known[:8])}, ...")
    # Segmentation and detection builders would download ImageNet weights for their backbone.
    module = models.get_model(name, weights=None, **({} if task == CLASSIFICATION else {"weights_backbone": None}))
    if weights is not None:
        path = Path(weights)
        if not path.is_file():
            raise OnnxlrfError(f"weights file not found: {path}")
        load_state_dict_checked(module, read_state_dict(path), f"torchvision:{name}")
    size = input_size(name, module)
    wrapped = {CLASSIFICATION: module, SEGMENTATION: SegmentationMap(module), DETECTION: FirstImageDetections(module)}
    return wrapped[task].eval(), size, task


def input_size(name: str, module: nn.Module) -> tuple[int, int]:
    # ViTs are built for one fixed size; detection models resize to their own minimum side inside
    # (320 for ssdlite320); others use their published weights' crop size, and 224 where the weights
    # have none (segmentation: their weights resize to 520, 5x the pixels and the time of 224).
    if isinstance(getattr(module, "image_size", None), int):
        return module.image_size, module.image_size
    transform = getattr(module, "transform", None)
    if transform is not None and hasattr(transform, "min_size"):
        side = int(transform.min_size[0])
        return side, side
    from torchvision import models

    preset = models.get_model_weights(name).DEFAULT.transforms
    crop = getattr(preset, "keywords", {}).get("crop_size", 224)
    crop = crop[0] if isinstance(crop, (list, tuple)) else crop
    return int(crop), int(crop)
