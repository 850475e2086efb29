"""CIFAR-10 ResNets of He et al. 2016, as published by akamaster/pytorch_resnet_cifar10.

The architecture matches the published checkpoints exactly ("option A"
shortcut: stride-2 subsampling plus zero channel padding, no shortcut
parameters), so their ``state_dict`` loads without renaming beyond the
``module.`` prefix that ``DataParallel`` added.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from onnxlrf.errors import OnnxlrfError

DEPTHS = {"cifar10-resnet20": 20, "cifar10-resnet32": 32, "cifar10-resnet44": 44, "cifar10-resnet56": 56}
# The published file of each depth (resnet110 is published too but not offered as a model name).
PUBLISHED_FILES = {
    20: "resnet20-12fca82f.th",
    32: "resnet32-d509ac18.th",
    44: "resnet44-014dd654.th",
    56: "resnet56-4bfd9763.th",
    110: "resnet110-1d1ed7c2.th",
}
DOWNLOAD_URL = "https://github.com/akamaster/pytorch_resnet_cifar10/raw/master/pretrained_models/{file}"
# Inputs are RGB in [0, 1] normalized with these statistics.
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


class ShortcutA(nn.Module):
    """Option A shortcut: subsample by 2 and pad channels with zeros on both sides."""

    def __init__(self, planes: int) -> None:
        super().__init__()
        self.pad = planes // 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = ShortcutA(planes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs: three stages of widths 16/32/64, then Linear(64, classes)."""

    def __init__(self, depth: int, num_classes: int = 10) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise OnnxlrfError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        blocks = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        in_planes = 16
        stages = []
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            layers = []
            for i in range(blocks):
                layers.append(BasicBlock(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3 = stages
        self.linear = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


def cache_dir() -> Path:
    return Path(os.environ.get("ONNXLRF_CACHE") or Path.home() / ".cache" / "onnxlrf")


def resolve_weights(name: str, weights: str | os.PathLike | None) -> Path:
    """The checkpoint to load: ``weights``, else the published file in the cache, else download it there."""
    if weights is not None:
        path = Path(weights)
        if not path.is_file():
            raise OnnxlrfError(f"weights file not found: {path}")
        return path
    file = PUBLISHED_FILES[DEPTHS[name]]
    cached = cache_dir() / file
    if cached.is_file():
        return cached
    url = DOWNLOAD_URL.format(file=file)
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(url, str(cached), progress=False)
    except Exception as exc:
        raise OnnxlrfError(
            f"cannot download {name} weights from {url} ({type(exc).__name__}); "
            f"pass --weights PATH or set ONNXLRF_CACHE to a directory holding {file}"
        ) from None
    return cached


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read an akamaster checkpoint (or a bare state_dict) and strip the DataParallel prefix."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise OnnxlrfError(f"cannot read weights {path}: {type(exc).__name__}: {exc}".splitlines()[0]) from None
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise OnnxlrfError(f"weights {path} hold no state_dict")
    return {k.removeprefix("module."): v for k, v in state.items()}


def build(name: str, weights: str | os.PathLike | None) -> nn.Module:
    from . import load_state_dict_checked

    module = CifarResNet(DEPTHS[name])
    load_state_dict_checked(module, read_state_dict(resolve_weights(name, weights)), name)
    return module.eval()
