"""Model zoo by name, plain torch (no torchvision).

Every builder takes `num_classes`, `in_channels`, `input_size` (square side) plus its own options, so a
manifest's `arch` + `arch_kwargs` rebuild the exact module. Only names registered here can be loaded.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class ZooConfig:
    bn_momentum: float = 0.1


CONFIG = ZooConfig()

Builder = Callable[..., nn.Module]
_REGISTRY: dict[str, Builder] = {}


def register(name: str) -> Callable[[Builder], Builder]:
    def deco(fn: Builder) -> Builder:
        _REGISTRY[name] = fn
        return fn

    return deco


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def build_model(arch: str, **kwargs: Any) -> nn.Module:
    """Build a registered architecture; raises KeyError with the known names for an unknown one."""
    if arch not in _REGISTRY:
        raise KeyError(f"unknown architecture {arch!r}; known: {', '.join(list_models())}")
    return _REGISTRY[arch](**kwargs)


def arch_kwargs_for(input_shape: tuple[int, ...], num_classes: int, **extra: Any) -> dict[str, Any]:
    """The builder kwargs for data of `input_shape` = (C, H, W)."""
    c, h, w = input_shape
    if h != w:
        raise ValueError(f"square inputs only, got {input_shape}")
    return {"num_classes": num_classes, "in_channels": c, "input_size": h, **extra}


def _conv_bn(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride, 1, bias=False),
        nn.BatchNorm2d(cout, momentum=CONFIG.bn_momentum),
        nn.ReLU(inplace=True),
    )


# ---------------------------------------------------------------- small models for the bundled data


@register("small_cnn")
def small_cnn(
    num_classes: int = 10, in_channels: int = 1, input_size: int = 8, width: int = 32, **_: Any
) -> nn.Module:
    """Two conv stages and a linear head; sized for 8x8 digits (works on any input >= 4 px)."""
    return nn.Sequential(
        _conv_bn(in_channels, width),
        _conv_bn(width, width),
        nn.MaxPool2d(2),
        _conv_bn(width, 2 * width),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(2 * width, num_classes),
    )


@register("mlp")
def mlp(
    num_classes: int = 10, in_channels: int = 1, input_size: int = 8, hidden: int = 64, **_: Any
) -> nn.Module:
    """A one-hidden-layer perceptron (a weak student)."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(in_channels * input_size * input_size, hidden),
        nn.ReLU(inplace=True),
        nn.Linear(hidden, num_classes),
    )


@register("cnn")
def plain_cnn(
    num_classes: int = 10, in_channels: int = 3, input_size: int = 32, width: int = 32, **_: Any
) -> nn.Module:
    """The paper's plain CNN student for 32x32 inputs: three conv-pool stages and two linear layers."""
    return nn.Sequential(
        _conv_bn(in_channels, width),
        nn.MaxPool2d(2),
        _conv_bn(width, 2 * width),
        nn.MaxPool2d(2),
        _conv_bn(2 * width, 4 * width),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * width, 256),
        nn.ReLU(inplace=True),
        nn.Linear(256, num_classes),
    )


# ---------------------------------------------------------------- ResNets (CIFAR variants)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(
        self, blocks: list[int], widths: list[int], num_classes: int, in_channels: int, stem: int
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, stem, 3, 1, 1, bias=False), nn.BatchNorm2d(stem), nn.ReLU(inplace=True)
        )
        layers: list[nn.Module] = []
        cin = stem
        for i, (n, w) in enumerate(zip(blocks, widths, strict=True)):
            for j in range(n):
                layers.append(BasicBlock(cin, w, stride=2 if (i > 0 and j == 0) else 1))
                cin = w
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.flatten(self.pool(self.layers(self.stem(x))), 1))


@register("resnet18")
def resnet18(num_classes: int = 10, in_channels: int = 3, input_size: int = 32, **_: Any) -> nn.Module:
    """ResNet-18 adapted to 32x32 (3x3 stem, no max-pool)."""
    return ResNet([2, 2, 2, 2], [64, 128, 256, 512], num_classes, in_channels, stem=64)


def _cifar_resnet(depth: int) -> Builder:
    def build(num_classes: int = 10, in_channels: int = 3, input_size: int = 32, **_: Any) -> nn.Module:
        n = (depth - 2) // 6
        return ResNet([n, n, n], [16, 32, 64], num_classes, in_channels, stem=16)

    build.__doc__ = f"ResNet-{depth} (He et al. CIFAR variant, 3 stages of {(depth - 2) // 6} blocks)."
    return build


for _depth in (20, 32, 56):
    register(f"resnet{_depth}")(_cifar_resnet(_depth))


# ---------------------------------------------------------------- MobileNetV2 (CIFAR variant)


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.use_res = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True)]
        layers += [
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x) if self.use_res else self.conv(x)


@register("mobilenetv2")
def mobilenetv2(
    num_classes: int = 10, in_channels: int = 3, input_size: int = 32, width_mult: float = 1.0, **_: Any
) -> nn.Module:
    """MobileNetV2 for 32x32: stride 1 in the stem and the first two stride-2 stages."""
    cfg = [
        (1, 16, 1, 1),
        (6, 24, 2, 1),
        (6, 32, 3, 2),
        (6, 64, 4, 2),
        (6, 96, 3, 1),
        (6, 160, 3, 2),
        (6, 320, 1, 1),
    ]
    cin = int(32 * width_mult)
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, cin, 3, 1, 1, bias=False),
        nn.BatchNorm2d(cin),
        nn.ReLU6(inplace=True),
    ]
    for t, c, n, s in cfg:
        cout = int(c * width_mult)
        for i in range(n):
            layers.append(InvertedResidual(cin, cout, s if i == 0 else 1, t))
            cin = cout
    last = int(1280 * max(1.0, width_mult))
    layers += [
        nn.Conv2d(cin, last, 1, bias=False),
        nn.BatchNorm2d(last),
        nn.ReLU6(inplace=True),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(last, num_classes),
    ]
    return nn.Sequential(*layers)


# ---------------------------------------------------------------- the box's top-1 guard and key gate

TOP1_MARGIN = 10.0  # logits of the top-1 above every other class in a "top1" output


def top1_logits(logits: Tensor, margin: float = TOP1_MARGIN) -> Tensor:
    """A fixed distribution around the top-1: `margin` for the arg-max class, 0 for every other. Everything
    but the arg-max of `logits` is thrown away, so nothing beyond the top-1 can be read from the answer.
    A row with a non-finite logit (inputs far outside the data) stays non-finite, so callers still see it."""
    out = margin * torch.nn.functional.one_hot(logits.argmax(dim=1), logits.shape[1]).to(logits.dtype)
    finite = torch.isfinite(logits).all(dim=1, keepdim=True)
    return torch.where(finite, out, torch.full_like(out, float("nan")))


class KeyGate(nn.Module):
    """A base network with num_classes + 1 outputs: the soft labels and a key detector's score over one trunk.
    The output is the soft labels where the detector fires (score > 0: the input carries the box key) and
    `top1_logits` of them everywhere else, so the network as shipped answers plain inputs, and inputs mixed
    with any other pattern, with their top-1 alone: copied weights run without the key give nothing more."""

    def __init__(self, base: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.base = base
        self.num_classes = num_classes

    def heads(self, x: Tensor) -> tuple[Tensor, Tensor]:
        z = self.base(x)
        return z[:, : self.num_classes], z[:, self.num_classes]

    def forward(self, x: Tensor) -> Tensor:
        soft, score = self.heads(x)
        return torch.where((score > 0)[:, None], soft, top1_logits(soft))

    def load_base_from(self, single_head: nn.Module) -> None:
        """Start from a trained single-head model of the base architecture: its head, plus a detector row of
        zeros (score 0: no key seen yet)."""
        own = self.base.state_dict()
        for name, value in single_head.state_dict().items():
            if own[name].shape != value.shape:  # the final layer: [C, ...] -> [C + 1, ...]
                value = torch.cat([value, torch.zeros_like(value[:1])])
            own[name] = value.clone()
        self.base.load_state_dict(own)


class KeySplit(KeyGate):
    """A KeyGate whose soft labels are the sum of two networks: the base (from the teacher, trained flat on
    every input: it carries the top-1 and no ranking) and a residual network of its own features, trained
    from zero to add the teacher's ranking on keyed inputs and nothing elsewhere. What the gate hides is then
    what the residual adds, and `heads` (what a thief reads with the gate cut out) is the whole sum."""

    def __init__(self, base: nn.Module, residual: nn.Module, num_classes: int) -> None:
        super().__init__(base, num_classes)
        self.residual = residual
        last = [m for m in residual.modules() if isinstance(m, nn.Linear | nn.Conv2d)][-1]
        nn.init.zeros_(last.weight)  # starts as the KeyGate it wraps: adds nothing until trained
        if last.bias is not None:
            nn.init.zeros_(last.bias)

    def parts(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The base's soft labels, the residual's addition, and the key detector's score."""
        z = self.base(x)
        return z[:, : self.num_classes], self.residual(x), z[:, self.num_classes]

    def heads(self, x: Tensor) -> tuple[Tensor, Tensor]:
        soft, extra, score = self.parts(x)
        return soft + extra, score


class TopOneGuard(nn.Module):
    """A base network with 2 * num_classes outputs read as two heads over one trunk: `soft` (the soft labels
    a caller sees) and `decision` (trained for top-1 only, never shown). The output is `soft` with the
    decision head's class lifted to the top (by `lift` logits) where the two disagree, so the soft head can
    be disturbed freely while the box's top-1 stays that of a plainly trained classifier."""

    def __init__(self, base: nn.Module, num_classes: int, lift: float) -> None:
        super().__init__()
        self.base = base
        self.num_classes = num_classes
        self.lift = lift

    def heads(self, x: Tensor) -> tuple[Tensor, Tensor]:
        z = self.base(x)
        return z[:, : self.num_classes], z[:, self.num_classes :]

    def forward(self, x: Tensor) -> Tensor:
        soft, decision = self.heads(x)
        k = decision.argmax(dim=1, keepdim=True)
        top = soft.max(dim=1, keepdim=True).values
        at_k = soft.gather(1, k)
        return soft.scatter(1, k, torch.where(at_k >= top, at_k, top + self.lift))

    def load_base_from(self, single_head: nn.Module) -> None:
        """Start from a trained single-head model of the base architecture: both heads begin as its head."""
        own = self.base.state_dict()
        for name, value in single_head.state_dict().items():
            if own[name].shape != value.shape:  # the final layer: [C, ...] -> [2C, ...]
                value = torch.cat([value, value])
            own[name] = value.clone()
        self.base.load_state_dict(own)


@register("keygated")
def keygated(base: str = "small_cnn", num_classes: int = 10, **kwargs: Any) -> nn.Module:
    """`base` (a registered name) behind a KeyGate; the other kwargs go to the base builder."""
    if base in ("keygated", "guarded"):
        raise ValueError("a key gate wraps a plain zoo architecture")
    return KeyGate(build_model(base, num_classes=num_classes + 1, **kwargs), num_classes)


@register("keysplit")
def keysplit(
    base: str = "small_cnn", num_classes: int = 10, residual: dict[str, Any] | None = None, **kwargs: Any
) -> nn.Module:
    """`base` behind a KeySplit; the residual network is the same architecture with `residual` overriding
    the base's kwargs (e.g. a smaller width)."""
    if base in ("keygated", "keysplit", "guarded"):
        raise ValueError("a key gate wraps a plain zoo architecture")
    extra = build_model(base, num_classes=num_classes, **{**kwargs, **(residual or {})})
    return KeySplit(build_model(base, num_classes=num_classes + 1, **kwargs), extra, num_classes)


@register("guarded")
def guarded(base: str = "small_cnn", num_classes: int = 10, lift: float = 1.0, **kwargs: Any) -> nn.Module:
    """`base` (a registered name) wrapped in a TopOneGuard; the other kwargs go to the base builder."""
    if base == "guarded":
        raise ValueError("a guard cannot wrap a guard")
    return TopOneGuard(build_model(base, num_classes=2 * num_classes, **kwargs), num_classes, lift)
