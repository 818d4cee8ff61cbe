"""The models of the experiments, built by name.

All of them are written so that `torch.func.functional_call` + `torch.func.vmap` can evaluate many parameter sets
at once (one per client, each on its own batch): no BatchNorm (its running statistics are buffers that a per-client
vmap cannot update, and its batch dependence would couple examples), no in-place operations on activations, no
data-dependent Python control flow, flattening with `flatten(1)`. Layer sizes depend only on `input_shape`, which is
fixed at build time.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from gradalign.config import MODELS


def build_model(name: str, input_shape: Sequence[int], num_classes: int) -> nn.Module:
    """A freshly initialised model (float32, CPU; seed torch beforehand for reproducible weights).

    `input_shape` is the shape of one example: (C, H, W) for images (needed by lenet and resnet18), (C, L) for
    signals such as MNIST-1D's (1, 40), anything for logistic and mlp, which flatten. On signals, mlp and cnn are the
    MNIST-1D paper's models (`MNIST1DMLP`, `MNIST1DCNN`); on anything else mlp is `MLP` and cnn takes images.
    """
    input_shape = tuple(int(s) for s in input_shape)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes={num_classes!r}: must be a positive integer")
    if not input_shape or min(input_shape) < 1:
        raise ValueError(f"input_shape={input_shape!r}: must be a non-empty tuple of positive sizes")
    if name == "logistic":
        return Logistic(math.prod(input_shape), num_classes)
    if len(input_shape) == 2 and name == "mlp":
        return MNIST1DMLP(math.prod(input_shape), num_classes)
    if len(input_shape) == 2 and name == "cnn":
        return MNIST1DCNN(*input_shape, num_classes)
    if name == "mlp":
        return MLP(math.prod(input_shape), num_classes)
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid models: {', '.join(MODELS)}")
    if len(input_shape) != 3:
        raise ValueError(
            f"model {name!r} takes images of shape (C, H, W), got input_shape={input_shape!r}; use model 'mlp' or "
            "'logistic' for vector data, or 'mlp', 'cnn' or 'logistic' for signals (C, L)"
        )
    channels, height, width = input_shape
    if name == "cnn":
        return CNN(channels, height, width, num_classes)
    if name == "lenet":
        return LeNet(channels, height, width, num_classes)
    return ResNet18(channels, num_classes)


def has_batchnorm(model: nn.Module) -> bool:
    """Whether any submodule is a BatchNorm (any dimension, SyncBatchNorm, lazy variants).

    Such models carry running statistics and mix examples within a batch, which per-client vmap cannot reproduce.
    """
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


class MLP(nn.Sequential):
    """Flatten, then fully connected ReLU layers (two of 200 units by default), then the classifier."""

    def __init__(self, in_features: int, num_classes: int, hidden: Sequence[int] = (200, 200)):
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, num_classes))
        super().__init__(*layers)


class Logistic(nn.Sequential):
    """Multinomial logistic regression: flatten, then one linear layer to the class scores."""

    def __init__(self, in_features: int, num_classes: int):
        super().__init__(nn.Flatten(), nn.Linear(in_features, num_classes))


class MNIST1DMLP(nn.Module):
    """The MLP of the MNIST-1D paper (Greydanus & Kobak; `MLPBase` in the mnist1d repository's notebooks/models.py).

    Flatten, then h = relu(W1 x); h = h + relu(W2 h) (a residual second layer); scores W3 h. 100 hidden units:
    15,210 parameters on MNIST-1D's 40 inputs and 10 classes.
    """

    def __init__(self, in_features: int, num_classes: int, hidden: int = 100):
        super().__init__()
        self.linear1 = nn.Linear(in_features, hidden)
        self.linear2 = nn.Linear(hidden, hidden)
        self.linear3 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.linear1(x.flatten(1)))
        h = h + torch.relu(self.linear2(h))
        return self.linear3(h)


def _conv1d_length(length: int, kernel: int, stride: int, padding: int) -> int:
    return (length + 2 * padding - kernel) // stride + 1


class MNIST1DCNN(nn.Module):
    """The CNN of the MNIST-1D paper (`ConvBase` in the mnist1d repository's notebooks/models.py), for signals [C, L].

    Three ReLU convolutions of 25 channels: kernel 5, stride 2, padding 1, then twice kernel 3, stride 2, padding 1
    (length 40 -> 19 -> 10 -> 5), flattened into one linear layer to the class scores. 5,210 parameters on MNIST-1D.
    """

    def __init__(self, channels: int, length: int, num_classes: int, width: int = 25):
        super().__init__()
        out = length
        for kernel in (5, 3, 3):
            out = _conv1d_length(out, kernel, 2, 1)
        if out < 1:
            raise ValueError(
                f"model 'cnn' on signals needs a length of at least 3 (three stride-2 convolutions), got {length}"
            )
        self.conv1 = nn.Conv1d(channels, width, 5, stride=2, padding=1)
        self.conv2 = nn.Conv1d(width, width, 3, stride=2, padding=1)
        self.conv3 = nn.Conv1d(width, width, 3, stride=2, padding=1)
        self.linear = nn.Linear(width * out, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv1(x))
        h = torch.relu(self.conv2(h))
        h = torch.relu(self.conv3(h))
        return self.linear(h.flatten(1))


class CNN(nn.Sequential):
    """The small CNN of the FedAvg / GradAlign experiments.

    conv 5x5 (32) - ReLU - maxpool 2 - conv 5x5 (64) - ReLU - maxpool 2 - dense 512 - ReLU - classifier. Padding 2
    keeps the spatial size through each convolution, so only the pools shrink it: 28x28 -> 7x7, 32x32 -> 8x8,
    8x8 -> 2x2.
    """

    def __init__(self, channels: int, height: int, width: int, num_classes: int):
        if min(height, width) < 4:
            raise ValueError(f"model 'cnn' needs images of at least 4x4 (two 2x2 pools), got {height}x{width}")
        flat = 64 * (height // 4) * (width // 4)
        super().__init__(
            nn.Conv2d(channels, 32, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(flat, 512),
            nn.ReLU(),
            nn.Linear(512, num_classes),
        )


class LeNet(nn.Sequential):
    """LeNet-5-style network for CIFAR: conv 5x5 (6) - pool - conv 5x5 (16) - pool - dense 120 - 84 - classifier.

    On images of at least 16x16 the convolutions are unpadded, as in the classic network (32x32 -> 16x5x5 features);
    smaller images (e.g. the 8x8 digits) get padding 2, so the convolutions keep the size and only the pools shrink
    it (8x8 -> 16x2x2).
    """

    def __init__(self, channels: int, height: int, width: int, num_classes: int):
        if min(height, width) < 4:
            raise ValueError(f"model 'lenet' needs images of at least 4x4 (two 2x2 pools), got {height}x{width}")
        pad = 0 if min(height, width) >= 16 else 2
        h, w = height, width
        for _ in range(2):
            h, w = (h + 2 * pad - 4) // 2, (w + 2 * pad - 4) // 2
        super().__init__(
            nn.Conv2d(channels, 6, 5, padding=pad),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5, padding=pad),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(16 * h * w, 120),
            nn.ReLU(),
            nn.Linear(120, 84),
            nn.ReLU(),
            nn.Linear(84, num_classes),
        )


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(32, channels), channels)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with GroupNorm and an identity (or 1x1 projection) shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.norm1 = _norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.norm2 = _norm(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), _norm(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 for small images: 3x3 stride-1 stem without max-pool (CIFAR style), GroupNorm instead of BatchNorm.

    Stages of 64, 128, 256, 512 channels (two blocks each; strides 1, 2, 2, 2), global average pool, classifier.
    ~11.2M parameters for CIFAR-10. Works for any image of at least 1x1 (8x8 digits end at 1x1 before the pool).
    `width` scales the channel counts (64 is ResNet-18; build_model always uses it; smaller ones make cheap tests).
    """

    def __init__(self, channels: int, num_classes: int, width: int = 64):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(channels, width, 3, padding=1, bias=False), _norm(width), nn.ReLU())
        blocks: list[nn.Module] = []
        current = width
        for out, stride in ((width, 1), (2 * width, 2), (4 * width, 2), (8 * width, 2)):
            blocks += [BasicBlock(current, out, stride), BasicBlock(out, out, 1)]
            current = out
        self.layers = nn.Sequential(*blocks)
        self.fc = nn.Linear(current, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.layers(self.stem(x)).mean(dim=(-2, -1))
        return self.fc(features)
