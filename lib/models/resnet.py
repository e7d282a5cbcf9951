"""ResNet-18 and ResNet-50 for 32x32 CIFAR images (He et al., 2016).

The CIFAR variants replace ImageNet's 7x7 stride-2 stem and max-pool with one
3x3 stride-1 convolution, so the 32x32 input keeps its resolution into stage 1
(the layout of kuangliu/pytorch-cifar, 11,173,962 parameters for ResNet-18 with
10 classes). ResNet-50 can also keep the ImageNet stem, as the seed did; that
stem shrinks a 32x32 image to 8x8 before stage 1, so the task upsamples inputs
to `model.input_size` (224) whenever `model.needs_upsample` is true.
"""
from __future__ import annotations

import torch
from torch import nn


def _shortcut(in_planes: int, out_planes: int, stride: int) -> nn.Module:
    """Identity, or a 1x1 conv + BN where the shape changes."""
    if stride == 1 and in_planes == out_planes:
        return nn.Identity()
    return nn.Sequential(
        nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False),
        nn.BatchNorm2d(out_planes),
    )


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = _shortcut(in_planes, planes, stride)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carrying the stride, as torchvision's v1.5), 1x1 expand."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        out_planes = planes * self.expansion
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = _shortcut(in_planes, out_planes, stride)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + self.shortcut(x))


_STEMS = ("cifar", "imagenet")


class ResNet(nn.Module):
    """Stem, four stages of residual blocks (widths 64/128/256/512), avgpool, fc."""

    def __init__(self, block: type[nn.Module], num_blocks: list[int], num_classes: int,
                 stem: str = "cifar"):
        super().__init__()
        if stem not in _STEMS:
            raise ValueError(f"unknown ResNet stem {stem!r}; valid stems: {', '.join(_STEMS)}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be at least 1, got {num_classes}")
        # The ImageNet stem divides the resolution by 4 before stage 1, which
        # only makes sense on ImageNet-sized inputs.
        self.input_size = 32 if stem == "cifar" else 224
        self.stem = self._make_stem(stem)
        self.in_planes = 64
        stages = []
        for i, (width, n) in enumerate(zip((64, 128, 256, 512), num_blocks)):
            stages.append(self._make_stage(block, width, n, stride=1 if i == 0 else 2))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        self._init_weights()

    @property
    def needs_upsample(self) -> bool:
        """True when inputs must be resized from 32x32 to `input_size` first."""
        return self.input_size != 32

    @staticmethod
    def _make_stem(stem: str) -> nn.Sequential:
        if stem == "cifar":
            return nn.Sequential(nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False),
                                 nn.BatchNorm2d(64), nn.ReLU(inplace=True))
        return nn.Sequential(nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False),
                             nn.BatchNorm2d(64), nn.ReLU(inplace=True),
                             nn.MaxPool2d(3, stride=2, padding=1))

    def _make_stage(self, block: type[nn.Module], planes: int, n: int,
                    stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (n - 1):
            layers.append(block(self.in_planes, planes, s))
            self.in_planes = planes * block.expansion
        return nn.Sequential(*layers)

    def _init_weights(self) -> None:
        # torchvision's ResNet init: He-normal for convolutions (fan_out keeps
        # the backward signal's variance), BN as the identity, default Linear.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18_cifar(num_classes: int = 10) -> ResNet:
    """CIFAR ResNet-18: BasicBlock [2, 2, 2, 2]; 11,173,962 parameters for 10 classes."""
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes, stem="cifar")


def resnet50_cifar(num_classes: int = 100, stem: str = "cifar") -> ResNet:
    """ResNet-50: Bottleneck [3, 4, 6, 3]; 23,705,252 parameters for 100 classes
    with the CIFAR stem (23,712,932 with the ImageNet stem, whose inputs must be
    upsampled to 224x224: see `needs_upsample`)."""
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes, stem=stem)
