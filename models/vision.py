"""torchvision classification models (``torchvision:<name>``)."""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from onnxlrf.errors import OnnxlrfError

from .cifar_resnet import read_state_dict


def build(name: str, weights: str | os.PathLike | None) -> tuple[nn.Module, tuple[int, int]]:
    """The model (random weights unless a state_dict file is given) and its usual input size."""
    try:
        from torchvision import models
    except ImportError:
        raise OnnxlrfError("torchvision models need torchvision: pip install onnxlrf[vision]") from None
    from . import load_state_dict_checked

    known = models.list_models(module=models)  # classification models only
    if name not in known:
        raise OnnxlrfError(f"unknown model 'torchvision:{name}'; known torchvision models include: "
                           f"{', '.join(known[:8])}, ...")
    module = models.get_model(name, weights=None)
    if weights is not None:
        path = Path(weights)
        if not path.is_file():
            raise OnnxlrfError(f"weights file not found: {path}")
        load_state_dict_checked(module, read_state_dict(path), f"torchvision:{name}")
    return module.eval(), input_size(name, module)


def input_size(name: str, module: nn.Module) -> tuple[int, int]:
    # ViTs are built for one fixed size; others use their published weights' crop size.
    if isinstance(getattr(module, "image_size", None), int):
        return module.image_size, module.image_size
    from torchvision import models

    crop = models.get_model_weights(name).DEFAULT.transforms.keywords.get("crop_size", 224)
    crop = crop[0] if isinstance(crop, (list, tuple)) else crop
    return int(crop), int(crop)
