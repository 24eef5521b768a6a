"""Classifier architectures used in the membership-inference literature, behind a small registry.

Example:
    >>> model = ccl.models.create("mlp", num_classes=100, input_shape=(600,))  # Purchase100's MLP
    >>> model = ccl.models.create("resnet18", num_classes=10, input_shape=(3, 32, 32), seed=0)
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._checks import check_positive_int, expected
from ._registry import Registry
from .errors import CclError, InvalidArgumentError, InvalidArgumentTypeError

__all__ = [
    "describe",
    "CNN",
    "MLP",
    "DenseNet",
    "ResNet",
    "WideResNet",
    "available",
    "create",
    "is_user_model",
    "user_model_sha256",
]


# ----------------------------------------------------------------------------------------------------------
# Tabular
# ----------------------------------------------------------------------------------------------------------
class MLP(nn.Module):
    """Fully connected network; the default `hidden=(1024, 512, 256, 128)` with Tanh is the Purchase/Texas
    architecture of Nasr et al. (2018). Inputs of any shape are flattened."""

    def __init__(
        self,
        *,
        num_classes: int,
        input_shape: Sequence[int],
        hidden: Sequence[int] = (1024, 512, 256, 128),
        activation: str = "tanh",
    ) -> None:
        super().__init__()
        acts = {"tanh": nn.Tanh, "relu": nn.ReLU}
        if activation not in acts:
            raise InvalidArgumentError(expected("activation", f"one of {sorted(acts)}", activation))
        widths = [math.prod(input_shape), *hidden]
        layers: list[nn.Module] = [nn.Flatten()]
        for a, b in zip(widths[:-1], widths[1:], strict=True):
            layers += [nn.Linear(a, b), acts[activation]()]
        layers.append(nn.Linear(widths[-1], num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:  # (N, *input_shape) -> (N, num_classes)
        return self.net(x)


# ----------------------------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------------------------
class CNN(nn.Module):
    """A small CNN: two conv-BN-ReLU-pool stages (`width`, `2 * width` channels) and a linear head."""

    def __init__(self, *, num_classes: int, input_shape: Sequence[int], width: int = 32) -> None:
        super().__init__()
        c = input_shape[0]
        self.features = nn.Sequential(
            nn.Conv2d(c, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1, bias=False),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x: Tensor) -> Tensor:  # (N, C, H, W) -> (N, num_classes)
        return self.head(self.features(x))


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR-style ResNet (He et al., 2016): 3x3 stem, no max-pool, stages of 64/128/256/512 channels."""

    def __init__(
        self, *, num_classes: int, input_shape: Sequence[int], blocks: Sequence[int] = (2, 2, 2, 2), width: int = 64
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(input_shape[0], width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        layers, cin = [], width
        for i, n in enumerate(blocks):
            cout = width * 2**i
            for j in range(n):
                layers.append(_BasicBlock(cin, cout, 2 if (j == 0 and i > 0) else 1))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x: Tensor) -> Tensor:  # (N, 3, 32, 32) -> (N, num_classes)
        out = self.layers(self.stem(x))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


class _DenseLayer(nn.Module):
    def __init__(self, cin: int, growth: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.BatchNorm2d(cin),
            nn.ReLU(),
            nn.Conv2d(cin, 4 * growth, 1, bias=False),
            nn.BatchNorm2d(4 * growth),
            nn.ReLU(),
            nn.Conv2d(4 * growth, growth, 3, padding=1, bias=False),
        )

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([x, self.net(x)], 1)


class DenseNet(nn.Module):
    """CIFAR DenseNet (Huang et al., 2017) with bottlenecks and compression 0.5; default DenseNet-121:
    growth 32, blocks (6, 12, 24, 16), 3x3 stem."""

    def __init__(
        self, *, num_classes: int, input_shape: Sequence[int], blocks: Sequence[int] = (6, 12, 24, 16), growth: int = 32
    ) -> None:
        super().__init__()
        c = 2 * growth
        modules: list[nn.Module] = [nn.Conv2d(input_shape[0], c, 3, padding=1, bias=False)]
        for i, n in enumerate(blocks):
            for _ in range(n):
                modules.append(_DenseLayer(c, growth))
                c += growth
            if i < len(blocks) - 1:
                modules += [nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, c // 2, 1, bias=False), nn.AvgPool2d(2)]
                c //= 2
        modules += [nn.BatchNorm2d(c), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.features = nn.Sequential(*modules)
        self.head = nn.Linear(c, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


class _WideBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(cout), nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = None if (cin == cout and stride == 1) else nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        pre = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(pre))))
        return out + (x if self.shortcut is None else self.shortcut(pre))


class WideResNet(nn.Module):
    """WideResNet-depth-k (Zagoruyko & Komodakis, 2016), pre-activation; default WRN-28-2."""

    def __init__(self, *, num_classes: int, input_shape: Sequence[int], depth: int = 28, width: int = 2) -> None:
        super().__init__()
        if (depth - 4) % 6:
            raise InvalidArgumentError(expected("depth", "6n + 4 (e.g. 16, 22, 28, 40)", depth))
        n = (depth - 4) // 6
        widths = [16, 16 * width, 32 * width, 64 * width]
        layers: list[nn.Module] = [nn.Conv2d(input_shape[0], widths[0], 3, 1, 1, bias=False)]
        cin = widths[0]
        for i, cout in enumerate(widths[1:]):
            for j in range(n):
                layers.append(_WideBlock(cin, cout, 2 if (j == 0 and i > 0) else 1))
                cin = cout
        layers += [nn.BatchNorm2d(cin), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


# ----------------------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------------------
_IMAGE_MODELS = {"cnn", "resnet18", "resnet34", "densenet121", "wrn"}
_REGISTRY: Registry[nn.Module] = Registry("model")
_REGISTRY.register("mlp", MLP, doc="MLP 1024-512-256-128, Tanh (Purchase/Texas)")
_REGISTRY.register("cnn", CNN, doc="small CNN, 2 conv stages")
_REGISTRY.register("resnet18", ResNet, defaults={"blocks": (2, 2, 2, 2)}, doc="CIFAR ResNet-18")
_REGISTRY.register("resnet34", ResNet, defaults={"blocks": (3, 4, 6, 3)}, doc="CIFAR ResNet-34")
_REGISTRY.register("densenet121", DenseNet, doc="CIFAR DenseNet-121")
_REGISTRY.register("wrn", WideResNet, doc="WideResNet-28-k (depth=28, width=k)")


def _positive_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 1


# ----------------------------------------------------------------------------------------------------------
# Your own architecture: "package.module:function"
# ----------------------------------------------------------------------------------------------------------
_USER_MODEL = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
_USER_FORMAT = "'package.module:function', e.g. 'my_models.nets:build'"


def is_user_model(name: Any) -> bool:
    """Whether `name` names your own architecture, `"package.module:function"` (any string with a colon that
    is not a registered name): `create` imports it. Its syntax and importability are checked by `create`."""
    return isinstance(name, str) and ":" in name and name not in _REGISTRY.available()


def _resolve_user_model(name: str) -> tuple[Callable[..., Any], Any]:
    """(the factory `name` points at, its module), with one clear error for each way the path can be wrong."""
    if not _USER_MODEL.match(name):
        raise InvalidArgumentError(expected("model", f"a registered name or {_USER_FORMAT}", name))
    module_name, attr = name.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        missing = err.name or ""
        if not missing or module_name == missing or module_name.startswith(missing + "."):
            raise InvalidArgumentError(
                f"Cannot import the module {module_name!r} of the model {name!r}: no module named {missing!r}. "
                "Is it installed, or is the folder holding it on the Python path (PYTHONPATH)?"
            ) from None
        raise InvalidArgumentError(
            f"Importing the module {module_name!r} of the model {name!r} failed: it imports {missing!r}, which is "
            "not installed."
        ) from err
    except Exception as err:  # a SyntaxError or any error raised by the module's own code
        where = f" ({err.filename}, line {err.lineno})" if isinstance(err, SyntaxError) else ""
        raise InvalidArgumentError(
            f"Importing the module {module_name!r} of the model {name!r} failed{where}: "
            f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
        ) from err
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            public = sorted(
                n for n, v in vars(module).items() if callable(v) and not n.startswith("_") and not inspect.ismodule(v)
            )
            hint = (
                f" Its public callables: {', '.join(public[:12])}{', ...' if len(public) > 12 else ''}."
                if public
                else ""
            )
            raise InvalidArgumentError(
                f"The module {module_name!r} ({getattr(module, '__file__', None) or 'built in'}) has no attribute "
                f"{attr!r} for the model {name!r}.{hint}"
            )
        obj = getattr(obj, part)
    if not callable(obj) or inspect.ismodule(obj):
        raise InvalidArgumentError(
            f"{attr!r} in the module {module_name!r} is a {type(obj).__name__}, not a function or class; the model "
            f"{name!r} must name a callable that returns a torch.nn.Module."
        )
    return obj, module


def _user_kwargs(name: str, factory: Callable[..., Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    """`kwargs` as `factory` takes them: `seed` is passed only if it takes it (its weights are seeded anyway)."""
    try:
        sig = inspect.signature(factory)
    except (TypeError, ValueError):  # some builtins have no signature: pass everything
        return kwargs
    takes_any = any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
    if not takes_any and "seed" not in sig.parameters:
        kwargs = {k: v for k, v in kwargs.items() if k != "seed"}
    try:
        sig.bind(**kwargs)
    except TypeError as err:
        raise InvalidArgumentError(
            f"The model {name!r} cannot be called with the keywords {sorted(kwargs)}: {err}. It must take "
            "num_classes=, input_shape= (and optionally seed=) plus the model options."
        ) from None
    return kwargs


def user_model_sha256(name: str) -> str | None:
    """For your own model `"package.module:function"`: SHA-256 of the source files of its module and of the
    module defining the function (a cache key part: editing the code gives new weights). None when no source
    file is found (a compiled module); only those files are covered, not the modules they import."""
    factory, module = _resolve_user_model(name)
    files = set()
    for obj in (module, factory):
        try:
            found = inspect.getsourcefile(obj)
        except TypeError:
            found = None
        if found is None and inspect.ismodule(obj):
            found = getattr(obj, "__file__", None)
        if found and Path(found).is_file():
            files.add(str(Path(found).resolve()))
    if not files:
        return None
    h = hashlib.sha256()
    for f in sorted(files):
        h.update(Path(f).name.encode() + b"\0" + Path(f).read_bytes() + b"\0")
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------------------
# Creation
# ----------------------------------------------------------------------------------------------------------
def create(
    name: str, *, num_classes: int, input_shape: Sequence[int], seed: int | None = None, **params: Any
) -> nn.Module:
    """Builds a registered model, or your own: `name = "package.module:function"` imports the module and
    returns `function(num_classes=..., input_shape=..., seed=..., **params)` (`seed=` only if it takes it), which
    must be an `nn.Module`. With `seed`, the initial weights depend on it alone (not on global state): the call
    runs under `torch.random.fork_rng` after `torch.manual_seed(seed)`.

    Raises:
        ValueError: unknown name or parameter, `num_classes < 2`, an image model with a non-image input shape,
            or a user model path that cannot be imported or does not return an `nn.Module`.
    """
    check_positive_int("num_classes", num_classes, minimum=2)
    if isinstance(input_shape, (str, bytes)) or not isinstance(input_shape, Sequence):
        raise InvalidArgumentTypeError(expected("input_shape", "a tuple of positive ints such as (64,)", input_shape))
    if not input_shape or not all(_positive_int(s) for s in input_shape):
        raise InvalidArgumentError(expected("input_shape", "a non-empty tuple of positive ints", input_shape))
    shape = tuple(int(s) for s in input_shape)
    reserved = sorted({"num_classes", "input_shape", "seed"} & set(params))
    if reserved:  # ccl passes them itself, from the data and the seed rule
        raise InvalidArgumentError(expected("model_options", "options other than those ccl passes itself", reserved))
    if is_user_model(name):
        return _create_user_model(name, num_classes=num_classes, input_shape=shape, seed=seed, params=params)
    if name in _IMAGE_MODELS and len(shape) != 3:
        raise InvalidArgumentError(
            expected("input_shape", f"(channels, height, width) for the image model {name!r}", shape)
        )
    _REGISTRY.check_params(name, params)
    hidden = params.get("hidden")
    if hidden is not None and (
        isinstance(hidden, (str, bytes))
        or not isinstance(hidden, Sequence)
        or not all(_positive_int(h) for h in hidden)
    ):
        raise InvalidArgumentError(expected("hidden", "a list of positive layer widths such as [256, 128]", hidden))
    for key in ("width", "depth", "growth"):
        if key in params:
            check_positive_int(key, params[key])
    try:
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(int(seed))
            return _REGISTRY.create(name, num_classes=num_classes, input_shape=shape, **params)
    except (TypeError, ValueError, RuntimeError) as err:
        if isinstance(err, CclError):
            raise
        raise InvalidArgumentError(
            f"Cannot build model {name!r} with options {params} for inputs {shape}: {str(err).splitlines()[0]}"
        ) from None


def _create_user_model(
    name: str, *, num_classes: int, input_shape: tuple[int, ...], seed: int | None, params: dict[str, Any]
) -> nn.Module:
    factory, _ = _resolve_user_model(name)
    kwargs = _user_kwargs(
        name, factory, {"num_classes": num_classes, "input_shape": input_shape, "seed": seed, **params}
    )
    try:
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(int(seed))
            model = factory(**kwargs)
    except Exception as err:  # the user's code may raise anything (KeyError, AssertionError, ...)
        if isinstance(err, CclError):
            raise
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise InvalidArgumentError(
            f"Cannot build model {name!r} with options {params} for inputs {input_shape}: {type(err).__name__}: {first}"
        ) from err
    if not isinstance(model, nn.Module):
        raise InvalidArgumentError(
            f"The model {name!r} returned a {type(model).__module__}.{type(model).__qualname__}, not a torch.nn.Module."
        )
    return model


def available() -> list[str]:
    return _REGISTRY.available()


def describe(name: str) -> tuple[str, dict]:
    """(one-line description, {parameter: default}) of a registered name or of your own model (the first line
    of its docstring and its options with defaults)."""
    if is_user_model(name):
        factory, _ = _resolve_user_model(name)
        doc = (inspect.getdoc(factory) or f"your own model {name}").strip().splitlines()[0]
        try:
            sig = inspect.signature(factory)
        except (TypeError, ValueError):
            return doc, {}
        skip = {"num_classes", "input_shape", "seed"}
        return doc, {
            p.name: p.default
            for p in sig.parameters.values()
            if p.name not in skip and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is not p.empty
        }
    return _REGISTRY.describe(name)
