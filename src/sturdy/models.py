"""Reference architectures, created by name from a registry.

Every model maps images ``(N, C, H, W)`` to logits ``(N, num_classes)``, ends in an
``nn.Linear`` classifier (the "last linear layer" of the pairwise Lipschitz certificate), and is
traceable by ``torch.fx`` (no data-dependent control flow).

Example:
    >>> from sturdy.models import create_model
    >>> model = create_model("cnn", in_shape=(1, 8, 8), num_classes=10)
    >>> model(torch.zeros(2, 1, 8, 8)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

import inspect
from typing import Callable, Dict, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from sturdy.errors import ConfigurationError

__all__ = ["register_model", "create_model", "available_models"]

_MODELS: Dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator registering a model factory ``f(*, in_shape, num_classes, **kw) -> nn.Module``."""

    def deco(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _MODELS:
            raise ConfigurationError(f"a model named {name!r} is already registered")
        _MODELS[name] = factory
        return factory

    return deco


def available_models() -> Tuple[str, ...]:
    """Registered model names."""
    return tuple(sorted(_MODELS))


def create_model(name: str, *, in_shape: Sequence[int], num_classes: int, **kwargs: object) -> nn.Module:
    """Build a registered model.

    Args:
        name: registered name (see :func:`available_models`).
        in_shape: ``(C, H, W)`` of one input image.
        num_classes: number of output logits.
        **kwargs: architecture options of that model (e.g. ``width``, ``batchnorm``, ``pool``).

    Raises:
        ConfigurationError: unknown name, unknown option, or invalid shape.
    """
    if name not in _MODELS:
        raise ConfigurationError(f"unknown model {name!r}; known models: {', '.join(available_models())}")
    in_shape = tuple(int(s) for s in in_shape)
    if len(in_shape) != 3 or min(in_shape) < 1:
        raise ConfigurationError(f"in_shape must be (C, H, W) with positive sizes, got {in_shape}")
    if int(num_classes) < 2:
        raise ConfigurationError(f"num_classes must be >= 2, got {num_classes}")
    factory = _MODELS[name]
    accepted = set(inspect.signature(factory).parameters) - {"in_shape", "num_classes"}
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise ConfigurationError(
            f"model {name!r} has no option(s) {', '.join(unknown)}; its options are: {', '.join(sorted(accepted))}"
        )
    return factory(in_shape=in_shape, num_classes=int(num_classes), **kwargs)


def _flat(in_shape: Tuple[int, int, int]) -> int:
    c, h, w = in_shape
    return c * h * w


@register_model("linear")
def linear(*, in_shape: Tuple[int, int, int], num_classes: int) -> nn.Module:
    """Multinomial logistic regression on the flattened image."""
    return nn.Sequential(nn.Flatten(), nn.Linear(_flat(in_shape), num_classes))


@register_model("mlp")
def mlp(*, in_shape: Tuple[int, int, int], num_classes: int, width: int = 128, depth: int = 2) -> nn.Module:
    """ReLU MLP with ``depth`` hidden layers of ``width`` units."""
    if width < 1 or depth < 1:
        raise ConfigurationError(f"mlp needs width >= 1 and depth >= 1, got width={width}, depth={depth}")
    layers: list = [nn.Flatten()]
    fan_in = _flat(in_shape)
    for _ in range(depth):
        layers += [nn.Linear(fan_in, width), nn.ReLU()]
        fan_in = width
    layers.append(nn.Linear(fan_in, num_classes))
    return nn.Sequential(*layers)


class AOLLinear(nn.Module):
    """Almost-orthogonal linear layer (Prach and Lampert, 2022): ``y = W diag(d) x + b`` with
    ``d_j = (sum_i |W^T W|_ij)^(-1/2)``, so ``||W diag(d)||_2 <= 1`` for any ``W``.

    The certificate never takes that claim on trust: the rescaled weight is computed in ``forward`` from the
    parameter, so the Lipschitz bound traces into this layer and bounds the operator it really applies (a dense
    SVD or the structured bound), and the tests check the claim against both.
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features))
        nn.init.orthogonal_(self.weight)

    def rescaled_weight(self) -> torch.Tensor:
        gram = (self.weight.T @ self.weight).abs().sum(dim=1)
        return self.weight * gram.clamp_min(1e-12).rsqrt()[None, :]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.rescaled_weight(), self.bias)


@register_model("aol")
def aol(*, in_shape: Tuple[int, int, int], num_classes: int, width: int = 256, depth: int = 3) -> nn.Module:
    """An MLP of :class:`AOLLinear` layers (each 1-Lipschitz by construction) with ReLU: a network built for
    certificates, whose bound is the product of its layers' (at most 1)."""
    if width < 1 or depth < 1:
        raise ConfigurationError(f"aol needs width >= 1 and depth >= 1, got width={width}, depth={depth}")
    layers: list = [nn.Flatten()]
    fan_in = _flat(in_shape)
    for _ in range(depth):
        layers += [AOLLinear(fan_in, width), nn.ReLU()]
        fan_in = width
    layers.append(AOLLinear(fan_in, num_classes))
    return nn.Sequential(*layers)


class LiResBlock(nn.Module):
    """A residual block without BatchNorm, ``y = relu(x + conv(x))`` (LiResNet, Hu et al. 2023): its bound is
    ``1 + ||conv||``, computed like any other residual sum; the convolution starts small (scaled by ``init``)."""

    def __init__(self, channels: int, init: float = 0.1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        with torch.no_grad():
            self.conv.weight.mul_(init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.conv(x))


@register_model("liresnet")
def liresnet(*, in_shape: Tuple[int, int, int], num_classes: int, width: int = 32, depth: int = 4) -> nn.Module:
    """Residual network without BatchNorm (LiResNet): stem convolution, ``depth`` :class:`LiResBlock` s, 2x2
    average pooling, linear head. Built for certificates: no BatchNorm factor multiplies the bound."""
    if width < 1 or depth < 1:
        raise ConfigurationError(f"liresnet needs width >= 1 and depth >= 1, got width={width}, depth={depth}")
    c, h, w = in_shape
    layers: list = [nn.Conv2d(c, width, 3, padding=1), nn.ReLU()]
    layers += [LiResBlock(width) for _ in range(depth)]
    layers += [nn.AvgPool2d(2), nn.Flatten(), nn.Linear(width * (h // 2) * (w // 2), num_classes)]
    return nn.Sequential(*layers)


@register_model("cnn")
def cnn(
    *,
    in_shape: Tuple[int, int, int],
    num_classes: int,
    channels: Sequence[int] = (32, 64),
    width: int = 128,
    batchnorm: bool = False,
    pool: str = "max",
    convs_per_block: int = 1,
) -> nn.Module:
    """Conv-ReLU blocks (3x3, padding 1), each followed by 2x2 pooling, then a hidden and an output Linear.

    Args:
        channels: output channels of each block.
        width: hidden units of the fully connected layer.
        batchnorm: insert BatchNorm2d after every convolution.
        pool: ``"max"``, ``"avg"`` or ``"none"`` (pooling after each block; skipped once the
            feature map is 1 pixel wide).
        convs_per_block: convolutions per block.
    """
    if pool not in ("max", "avg", "none"):
        raise ConfigurationError(f"pool must be 'max', 'avg' or 'none', got {pool!r}")
    if not channels or min(channels) < 1 or width < 1 or convs_per_block < 1:
        raise ConfigurationError("cnn needs non-empty positive channels, width >= 1 and convs_per_block >= 1")
    c, h, w = in_shape
    layers: list = []
    for out in channels:
        for _ in range(convs_per_block):
            layers.append(nn.Conv2d(c, out, 3, padding=1, bias=not batchnorm))
            if batchnorm:
                layers.append(nn.BatchNorm2d(out))
            layers.append(nn.ReLU())
            c = out
        if pool != "none" and min(h, w) >= 2:
            layers.append(nn.MaxPool2d(2) if pool == "max" else nn.AvgPool2d(2))
            h, w = h // 2, w // 2
    layers += [nn.Flatten(), nn.Linear(c * h * w, width), nn.ReLU(), nn.Linear(width, num_classes)]
    return nn.Sequential(*layers)


class BasicBlock(nn.Module):
    """Pre-activation residual block: BN-ReLU-conv-BN-ReLU-conv plus a (projected) shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int, batchnorm: bool = True, dropout: float = 0.0) -> None:
        super().__init__()
        norm = (lambda c: nn.BatchNorm2d(c)) if batchnorm else (lambda c: nn.Identity())
        self.bn1 = norm(c_in)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=not batchnorm)
        self.bn2 = norm(c_out)
        self.relu2 = nn.ReLU()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(c_out, c_out, 3, stride=1, padding=1, bias=not batchnorm)
        self.shortcut = (
            nn.Identity()
            if stride == 1 and c_in == c_out
            else nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(x))
        y = self.conv1(out)
        y = self.conv2(self.dropout(self.relu2(self.bn2(y))))
        return y + self.shortcut(x)


class PostActBlock(nn.Module):
    """Post-activation residual block: conv-BN-ReLU-conv-BN plus a (projected, BN) shortcut, then ReLU. Every
    BatchNorm directly follows the convolution it normalises, so the certificate and the training-time estimate
    fold it into that convolution (one operator norm instead of a product of two)."""

    def __init__(self, c_in: int, c_out: int, stride: int, batchnorm: bool = True, dropout: float = 0.0) -> None:
        super().__init__()
        norm = (lambda c: nn.BatchNorm2d(c)) if batchnorm else (lambda c: nn.Identity())
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=not batchnorm)
        self.bn1 = norm(c_out)
        self.relu1 = nn.ReLU()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(c_out, c_out, 3, stride=1, padding=1, bias=not batchnorm)
        self.bn2 = norm(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=not batchnorm), norm(c_out))
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dropout(self.relu1(self.bn1(self.conv1(x))))
        return self.relu2(self.bn2(self.conv2(y)) + self.shortcut(x))


class ResNet(nn.Module):
    """Small residual network: stem conv, residual stages, pooled Linear head; ``layout="pre"`` (pre-activation
    blocks, :class:`BasicBlock`) or ``"post"`` (:class:`PostActBlock`, BatchNorm foldable)."""

    def __init__(
        self,
        in_shape: Tuple[int, int, int],
        num_classes: int,
        widths: Sequence[int],
        blocks_per_stage: int,
        batchnorm: bool,
        dropout: float = 0.0,
        layout: str = "pre",
    ) -> None:
        super().__init__()
        if layout not in ("pre", "post"):
            raise ConfigurationError(f"resnet layout must be 'pre' or 'post', got {layout!r}")
        c = in_shape[0]
        post = layout == "post"
        self.stem: nn.Module = nn.Conv2d(c, widths[0], 3, padding=1, bias=False)
        if post:  # conv-BN-ReLU stem; the blocks end with their own ReLU, so the head needs no BatchNorm
            bn = nn.BatchNorm2d(widths[0]) if batchnorm else nn.Identity()
            self.stem = nn.Sequential(self.stem, bn, nn.ReLU())
        blocks = []
        c = widths[0]
        for i, width in enumerate(widths):
            for j in range(blocks_per_stage):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append((PostActBlock if post else BasicBlock)(c, width, stride, batchnorm, dropout))
                c = width
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(c) if batchnorm and not post else nn.Identity()
        self.relu: nn.Module = nn.Identity() if post else nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        x = self.pool(self.relu(self.bn(x)))
        return self.fc(self.flatten(x))


@register_model("resnet")
def resnet(
    *,
    in_shape: Tuple[int, int, int],
    num_classes: int,
    widths: Sequence[int] = (16, 32, 64),
    blocks_per_stage: int = 1,
    batchnorm: bool = True,
    layout: str = "pre",
    bn_init: float = 1.0,
) -> nn.Module:
    """Small ResNet: ``layout="pre"`` (pre-activation) or ``"post"`` (BatchNorm folds into its convolution for the
    certificate); ``bn_init``: initial BatchNorm scale (at 1 LMT collapses on digits, 0.1 certified most)."""
    if not widths or min(widths) < 1 or blocks_per_stage < 1 or not 0 < bn_init < float("inf"):
        raise ConfigurationError(f"resnet needs positive widths, blocks_per_stage >= 1, bn_init > 0; got {bn_init!r}")
    return ResNet(in_shape, num_classes, widths, blocks_per_stage, batchnorm, layout=layout).apply(
        lambda m: nn.init.constant_(m.weight, bn_init) if isinstance(m, nn.BatchNorm2d) else None)


@register_model("wrn")
def wrn(
    *,
    in_shape: Tuple[int, int, int],
    num_classes: int,
    depth: int = 16,
    widen: int = 4,
    dropout: float = 0.0,
    batchnorm: bool = True,
) -> nn.Module:
    """Wide-ResNet-``depth``-``widen`` (Zagoruyko & Komodakis), designed for 32x32 inputs."""
    if (depth - 4) % 6 != 0 or depth < 10:
        raise ConfigurationError(f"wrn depth must be 6n+4 with n >= 1 (10, 16, 22, 28, ...), got {depth}")
    if widen < 1:
        raise ConfigurationError(f"wrn widen factor must be >= 1, got {widen}")
    n = (depth - 4) // 6
    widths = (16 * widen, 32 * widen, 64 * widen)
    model = ResNet(in_shape, num_classes, widths, n, batchnorm, dropout)
    # WRN's stem has 16 channels regardless of the widening factor.
    model.stem = nn.Conv2d(in_shape[0], 16, 3, padding=1, bias=False)
    first = model.blocks[0]
    model.blocks[0] = BasicBlock(16, widths[0], 1, batchnorm, dropout)
    del first
    return model


# ----------------------------------------------------------------------------- ImageNet-style ResNets


class _ImageNetBasicBlock(nn.Module):
    """ResNet-18/34 block (He et al. 2016): conv3x3-BN-ReLU-conv3x3-BN, plus the shortcut, then ReLU."""

    expansion = 1

    def __init__(self, c_in: int, width: int, stride: int, batchnorm: bool) -> None:
        super().__init__()
        c_out = width * self.expansion
        self.conv1 = nn.Conv2d(c_in, width, 3, stride=stride, padding=1, bias=not batchnorm)
        self.bn1 = nn.BatchNorm2d(width) if batchnorm else nn.Identity()
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(width, c_out, 3, padding=1, bias=not batchnorm)
        self.bn2 = nn.BatchNorm2d(c_out) if batchnorm else nn.Identity()
        self.shortcut = _projection(c_in, c_out, stride, batchnorm)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu1(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class _ImageNetBottleneck(nn.Module):
    """ResNet-50/101/152 block: conv1x1-BN-ReLU-conv3x3-BN-ReLU-conv1x1-BN (4x width), plus the shortcut,
    then ReLU. The stride sits on the first 1x1 convolution, as in the paper (torchvision's "v1.5" moves it
    to the 3x3 one: ``stride_in_3x3=True``)."""

    expansion = 4

    def __init__(self, c_in: int, width: int, stride: int, batchnorm: bool, stride_in_3x3: bool = False) -> None:
        super().__init__()
        c_out = width * self.expansion
        s1, s3 = (1, stride) if stride_in_3x3 else (stride, 1)
        self.conv1 = nn.Conv2d(c_in, width, 1, stride=s1, bias=not batchnorm)
        self.bn1 = nn.BatchNorm2d(width) if batchnorm else nn.Identity()
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(width, width, 3, stride=s3, padding=1, bias=not batchnorm)
        self.bn2 = nn.BatchNorm2d(width) if batchnorm else nn.Identity()
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(width, c_out, 1, bias=not batchnorm)
        self.bn3 = nn.BatchNorm2d(c_out) if batchnorm else nn.Identity()
        self.shortcut = _projection(c_in, c_out, stride, batchnorm)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu1(self.bn1(self.conv1(x)))
        y = self.relu2(self.bn2(self.conv2(y)))
        return self.relu(self.bn3(self.conv3(y)) + self.shortcut(x))


def _projection(c_in: int, c_out: int, stride: int, batchnorm: bool) -> nn.Module:
    """Identity shortcut, or the paper's option B: a 1x1 projection (with BatchNorm) when the shape changes."""
    if stride == 1 and c_in == c_out:
        return nn.Identity()
    conv = nn.Conv2d(c_in, c_out, 1, stride=stride, bias=not batchnorm)
    return nn.Sequential(conv, nn.BatchNorm2d(c_out)) if batchnorm else conv


class ImageNetResNet(nn.Module):
    """ResNet of He et al. (2016) for ImageNet-sized inputs: 7x7/2 stem conv, BatchNorm, ReLU, 3x3/2 max
    pooling, four stages (64, 128, 256, 512 base widths; stride 2 from the second on), global average
    pooling and a Linear classifier. ``batchnorm=False`` replaces every BatchNorm with the identity (the
    convolutions then get biases)."""

    def __init__(self, block: type, layers: Sequence[int], in_shape: Tuple[int, int, int], num_classes: int,
                 batchnorm: bool, **block_kwargs: object) -> None:
        super().__init__()
        self.stem = nn.Conv2d(in_shape[0], 64, 7, stride=2, padding=3, bias=not batchnorm)
        self.bn = nn.BatchNorm2d(64) if batchnorm else nn.Identity()
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        stages, c = [], 64
        for i, (n, width) in enumerate(zip(layers, (64, 128, 256, 512))):
            blocks = []
            for j in range(n):
                blocks.append(block(c, width, 2 if (i > 0 and j == 0) else 1, batchnorm, **block_kwargs))
                c = width * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn(self.stem(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.flatten(self.pool(x)))


@register_model("resnet18")
def resnet18(*, in_shape: Tuple[int, int, int], num_classes: int, batchnorm: bool = True) -> nn.Module:
    """ResNet-18 (He et al. 2016; basic blocks 2-2-2-2), designed for 224x224 inputs; 11.7M parameters
    with 1000 classes."""
    return ImageNetResNet(_ImageNetBasicBlock, (2, 2, 2, 2), in_shape, num_classes, batchnorm)


@register_model("resnet50")
def resnet50(
    *, in_shape: Tuple[int, int, int], num_classes: int, batchnorm: bool = True, stride_in_3x3: bool = False
) -> nn.Module:
    """ResNet-50 (He et al. 2016; bottleneck blocks 3-4-6-3), designed for 224x224 inputs; 25.6M
    parameters with 1000 classes. ``stride_in_3x3``: torchvision's variant (stride on the 3x3 convolution)."""
    return ImageNetResNet(_ImageNetBottleneck, (3, 4, 6, 3), in_shape, num_classes, batchnorm,
                          stride_in_3x3=stride_in_3x3)
