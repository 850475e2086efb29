"""torchvision models (``torchvision:<name>``): classification, segmentation and detection."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from onnxlrf.errors import OnnxlrfError

from .cifar_resnet import read_state_dict

CLASSIFICATION, SEGMENTATION, DETECTION = "classification", "segmentation", "detection"
RANDOM_WEIGHTS_SEED = 0
# Random images whose statistics random detection models' BatchNorms take (see set_batch_norm_statistics).
STATISTICS_IMAGES = 8


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
    # Seeded (in a forked generator, leaving the caller's untouched): the same name is the same model.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_WEIGHTS_SEED)
        module = models.get_model(name, weights=None, **({} if task == CLASSIFICATION else {"weights_backbone": None}))
        if weights is None:
            initialize_zero_weights(module)
        if weights is None and task == DETECTION:
            set_batch_norm_statistics(module, input_size(name, module))
    if weights is not None:
        path = Path(weights)
        if not path.is_file():
            raise OnnxlrfError(f"weights file not found: {path}")
        load_state_dict_checked(module, read_state_dict(path), f"torchvision:{name}")
    size = input_size(name, module)
    wrapped = {CLASSIFICATION: module, SEGMENTATION: SegmentationMap(module), DETECTION: FirstImageDetections(module)}
    return wrapped[task].eval(), size, task


def initialize_zero_weights(module: nn.Module) -> None:
    """Give every Conv/Linear weight that its builder set to zeros small random values (std 0.01).

    torchvision zero-initializes some layers for training (a ViT's classifier head): with random weights
    elsewhere the model's output is then a constant, the export check compares zeros and the
    label-free analysis sees no curvature anywhere before that layer.
    """
    for layer in module.modules():
        if isinstance(layer, (nn.Linear, nn.modules.conv._ConvNd)) and not layer.weight.detach().any():
            nn.init.normal_(layer.weight, std=0.01)


def set_batch_norm_statistics(module: nn.Module, size: tuple[int, int]) -> None:
    """Give every BatchNorm of ``module`` the running statistics of its inputs on random images.

    With their initial statistics (mean 0, variance 1) a random detector's features vanish on the
    way to its heads: every class of every anchor scores the same (1/91 for ssdlite320), its
    detections tie, and which of them it keeps is up to float rounding. Statistics measured on
    data make the scores differ, as a trained model's do.
    """
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    module.eval()  # the detector itself runs in eval mode (in train mode it wants targets)
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average over every batch
        norm.train()
    with torch.no_grad():  # images in [0, 1], as the detector's own normalization expects
        for _ in range(STATISTICS_IMAGES // 4):
            module(list(torch.rand(4, 3, *size)))
    for norm in norms:
        norm.eval()


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
