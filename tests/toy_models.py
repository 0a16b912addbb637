"""Tiny models the tests build from code (the file is also used as a FILE.py:FACTORY spec)."""

import torch
from torch import nn


class TinyCNN(nn.Module):
    def __init__(self, num_classes: int = 10, channels: int = 1, width: int = 16):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1, stride=2),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
        )
        self.classifier = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


def tiny_cnn(num_classes: int = 10) -> nn.Module:
    return TinyCNN(num_classes=num_classes)


def tiny_cnn_rgb(num_classes: int = 10) -> nn.Module:
    return TinyCNN(num_classes=num_classes, channels=3)


def not_a_module():
    return 42


def broken_factory():
    raise RuntimeError("factory exploded")


def wide_cnn_rgb(num_classes: int = 10) -> nn.Module:
    """Heavy enough convolutions that INT8 pays off on onnxruntime (used by the PTQ tests)."""
    return TinyCNN(num_classes=num_classes, channels=3, width=64)
