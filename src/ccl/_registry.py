"""A tiny name -> factory registry with helpful errors, shared by losses, attacks, models and datasets."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from ._checks import unknown_name
from .errors import InvalidArgumentError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to factories. `create(name, **params)` checks the name and the parameter names first."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._factories: dict[str, tuple[Callable[..., T], dict[str, Any], str]] = {}

    def register(
        self, name: str, factory: Callable[..., T], *, defaults: dict[str, Any] | None = None, doc: str = ""
    ) -> None:
        if name in self._factories:
            raise ValueError(f"{self.kind} {name!r} is already registered.")
        self._factories[name] = (factory, dict(defaults or {}), doc)

    def available(self) -> list[str]:
        return sorted(self._factories)

    def defaults(self, name: str) -> dict[str, Any]:
        return dict(self._entry(name)[1])

    def _entry(self, name: str) -> tuple[Callable[..., T], dict[str, Any], str]:
        if not isinstance(name, str) or name not in self._factories:
            raise InvalidArgumentError(unknown_name(self.kind, name, self._factories))
        return self._factories[name]

    def describe(self, name: str) -> tuple[str, dict[str, Any]]:
        """(doc, {parameter: default}) of a registered name: what `ccl report --list` prints. Parameters the
        caller always supplies (num_classes, input_shape, ...) have no default and are left out."""
        factory, defaults, doc = self._entry(name)
        sig = inspect.signature(factory)
        params = {}
        for p in sig.parameters.values():
            if p.kind not in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) or p.name in defaults:
                continue
            if p.default is not p.empty:
                params[p.name] = p.default
        return doc, params

    def parameters(self, name: str) -> list[str]:
        factory = self._entry(name)[0]
        sig = inspect.signature(factory)
        return [p.name for p in sig.parameters.values() if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]

    def check_params(self, name: str, params: dict[str, Any]) -> None:
        factory = self._entry(name)[0]
        sig = inspect.signature(factory)
        if any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
            return
        valid = self.parameters(name)
        for key in params:
            if key not in valid:
                msg = unknown_name(f"parameter of {self.kind} {name!r}", key, valid)
                msg = msg.replace("Valid parameter of", "Valid parameters of").replace("'s:", "':")
                raise InvalidArgumentError(msg)

    def create(self, name: str, **params: Any) -> T:
        factory, defaults, _ = self._entry(name)
        self.check_params(name, params)
        return factory(**{**defaults, **params})
