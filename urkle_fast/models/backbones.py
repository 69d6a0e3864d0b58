"""Feature extractors x -> h [B, feat_dim] and the mirrored decoders.

* resnet18 / resnet50: torchvision (weights=None), fc removed; stem="cifar" swaps the 7x7/2 conv and
  the max-pool for one 3x3/1 conv (32-pixel inputs), stem="imagenet" keeps torchvision's.
* resnet18_w16 / resnet18_w32: ResNet-18's layout (BasicBlocks 2-2-2-2, the same stems) at a quarter / half of
  its width (base 16 / 32 channels instead of 64; 8x16 = 128 / 256 features): about 1/16 / 1/4 of its FLOPs, the
  encoder a 2-core CPU can train on CIFAR-10 (issue 11's reduced protocol).
* mnist_conv: docs/MATH.md sec 1, four 3x3 convs (32, 64, 128, 128 channels; strides 1, 2, 2, 2), ReLU,
  global average pooling -> 128 features. MNISTDecoder mirrors it with four ConvTranspose2d.
* digits_conv: the same idea for scikit-learn's 8x8 digits (three 3x3 convs, 32/64/128).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torchvision


def resnet(depth: int, in_channels: int = 3, stem: str = "cifar") -> tuple[nn.Module, int]:
    ctor = {18: torchvision.models.resnet18, 50: torchvision.models.resnet50}[depth]
    net = ctor(weights=None)
    if stem == "cifar":
        net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    elif stem == "imagenet":
        if in_channels != 3:
            net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    else:
        raise ValueError(f"stem must be 'cifar' or 'imagenet', got {stem!r}")
    feat_dim = net.fc.in_features
    net.fc = nn.Identity()
    return net, feat_dim


class NarrowResNet(nn.Module):
    """ResNet-18 (torchvision's BasicBlock, 2-2-2-2) with base width ``width`` (ResNet-18: 64); features 8 x width."""

    def __init__(self, width: int, in_channels: int = 3, stem: str = "cifar", blocks=(2, 2, 2, 2)):
        super().__init__()
        from torchvision.models.resnet import BasicBlock

        if stem == "cifar":
            head = [nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False)]
        elif stem == "imagenet":
            head = [nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False)]
        else:
            raise ValueError(f"stem must be 'cifar' or 'imagenet', got {stem!r}")
        head += [nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
        if stem == "imagenet":
            head.append(nn.MaxPool2d(3, stride=2, padding=1))
        layers, c_in = [], width
        for i, n in enumerate(blocks):
            planes, stride = width * 2 ** i, 1 if i == 0 else 2
            for j in range(n):
                down = None
                if j == 0 and (stride != 1 or c_in != planes):
                    down = nn.Sequential(nn.Conv2d(c_in, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes))
                layers.append(BasicBlock(c_in, planes, stride if j == 0 else 1, down))
                c_in = planes
        self.net = nn.Sequential(*head, *layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.feat_dim = c_in
        for m in self.modules():  # torchvision's ResNet initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class MNISTConv(nn.Module):
    """28x28 -> 28 -> 14 -> 7 -> 4, then average pooling: [B, 128]."""

    feat_dim = 128

    def __init__(self, in_channels: int = 1):
        super().__init__()
        chans, strides = (32, 64, 128, 128), (1, 2, 2, 2)
        layers, c_in = [], in_channels
        for c, s in zip(chans, strides):
            layers += [nn.Conv2d(c_in, c, 3, stride=s, padding=1), nn.ReLU(inplace=True)]
            c_in = c
        self.net = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class MNISTDecoder(nn.Module):
    """z [B, d_z] -> pixel logits [B, C, 28, 28]; four ConvTranspose2d mirroring MNISTConv."""

    def __init__(self, d_z: int, out_channels: int = 1):
        super().__init__()
        self.fc = nn.Linear(d_z, 128 * 4 * 4)
        self.net = nn.Sequential(
            nn.ReLU(inplace=True),
            nn.ConvTranspose2d(128, 128, 3, stride=2, padding=1),  # 4 -> 7
            nn.ReLU(inplace=True),
            nn.ConvTranspose2d(128, 64, 4, stride=2, padding=1),  # 7 -> 14
            nn.ReLU(inplace=True),
            nn.ConvTranspose2d(64, 32, 4, stride=2, padding=1),  # 14 -> 28
            nn.ReLU(inplace=True),
            nn.ConvTranspose2d(32, out_channels, 3, stride=1, padding=1),  # 28 -> 28
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(self.fc(z).view(-1, 128, 4, 4))


class DigitsConv(nn.Module):
    """8x8 -> 8 -> 4 -> 2, then average pooling: [B, 128]."""

    feat_dim = 128

    def __init__(self, in_channels: int = 1):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(64, 128, 3, stride=2, padding=1), nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class DigitsDecoder(nn.Module):
    """z [B, d_z] -> pixel logits [B, C, 8, 8]; mirrors DigitsConv."""

    def __init__(self, d_z: int, out_channels: int = 1):
        super().__init__()
        self.fc = nn.Linear(d_z, 128 * 2 * 2)
        self.net = nn.Sequential(
            nn.ReLU(inplace=True),
            nn.ConvTranspose2d(128, 64, 4, stride=2, padding=1),  # 2 -> 4
            nn.ReLU(inplace=True),
            nn.ConvTranspose2d(64, 32, 4, stride=2, padding=1),  # 4 -> 8
            nn.ReLU(inplace=True),
            nn.ConvTranspose2d(32, out_channels, 3, stride=1, padding=1),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(self.fc(z).view(-1, 128, 2, 2))
