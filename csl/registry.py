"""Named choices for each of the five aspects.

One registry per aspect, in the manner of torchvision's ``register_model`` / ``get_model``: a builder is
registered under a name with a decorator, ``build(name, **options)`` makes one, ``names()`` lists them.
Adding a choice is one decorated function in its aspect's package; nothing else is edited.

Builders take keyword-only arguments. Two kinds exist:
- *options*: what a user or a search space sets (``temperature``, ``width``, ...);
- *context*: what the framework supplies from the stage before (``vector_dim``, ``map_channels``, ``dim``,
  ``mean``, ``std``). Context names are listed in ``CONTEXT`` and are never exposed as options.

A config is flat (one name per aspect plus options), so one search space spans choices with different knobs:
``build_from_config`` passes each builder only the options its signature declares (as timm drops what a
builder does not take). An option that *no* builder of the aspect, nor the trainer, knows is an error
raised elsewhere (``csl.config``), never silently swallowed.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any, Generic, TypeVar

T = TypeVar("T")

CONTEXT = frozenset({"vector_dim", "map_channels", "dim", "mean", "std", "image_size"})


class ChoiceError(ValueError):
    """A name or option that the registry does not know; the message lists what it does know."""


class Registry(Generic[T]):
    def __init__(self, aspect: str) -> None:
        self.aspect = aspect
        self._builders: dict[str, Callable[..., T]] = {}

    def register(self, name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        def decorator(builder: Callable[..., T]) -> Callable[..., T]:
            if name in self._builders:
                raise ChoiceError(f"{self.aspect} '{name}' is registered twice")
            for param in inspect.signature(builder).parameters.values():
                if param.kind is not inspect.Parameter.KEYWORD_ONLY:
                    raise TypeError(f"{self.aspect} builder '{name}': parameter '{param.name}' must be keyword-only")
            self._builders[name] = builder
            return builder

        return decorator

    def names(self) -> list[str]:
        return sorted(self._builders)

    def __contains__(self, name: object) -> bool:
        return name in self._builders

    def get(self, name: str) -> Callable[..., T]:
        if name not in self._builders:
            raise ChoiceError(f"unknown {self.aspect} '{name}'; choose one of: {', '.join(self.names())}")
        return self._builders[name]

    def options(self, name: str) -> dict[str, Any]:
        """User-settable options of one choice with their defaults (``inspect.Parameter.empty`` if required)."""
        params = inspect.signature(self.get(name)).parameters
        return {p.name: p.default for p in params.values() if p.name not in CONTEXT}

    def context(self, name: str) -> list[str]:
        params = inspect.signature(self.get(name)).parameters
        return [p for p in params if p in CONTEXT]

    def all_options(self) -> set[str]:
        return {opt for name in self._builders for opt in self.options(name)}

    def build(self, name: str, **options: Any) -> T:
        """Build with exactly these options; an option the builder does not take is an error naming it."""
        builder = self.get(name)
        params = inspect.signature(builder).parameters
        unknown = sorted(set(options) - set(params))
        if unknown:
            allowed = ", ".join(sorted(self.options(name))) or "none"
            raise ChoiceError(f"{self.aspect} '{name}' takes no option {', '.join(unknown)}; its options: {allowed}")
        return builder(**options)

    def build_from_config(self, name: str, config: Mapping[str, Any], context: Mapping[str, Any]) -> T:
        """Build from a flat config: take the options this builder declares, plus the context it asks for."""
        params = inspect.signature(self.get(name)).parameters
        kwargs = {k: v for k, v in config.items() if k in params and k not in CONTEXT and v is not None}
        for key in params:
            if key in CONTEXT:
                if key not in context:
                    raise ChoiceError(f"{self.aspect} '{name}' needs '{key}', which the framework did not supply")
                kwargs[key] = context[key]
        return self.build(name, **kwargs)


AUGMENT: Registry[Any] = Registry("augment")
ENCODER: Registry[Any] = Registry("encoder")
EXTRACT: Registry[Any] = Registry("extract")
SIMILARITY: Registry[Any] = Registry("similarity")
LOSS: Registry[Any] = Registry("loss")

ASPECTS: dict[str, Registry[Any]] = {
    "augment": AUGMENT,
    "encoder": ENCODER,
    "extract": EXTRACT,
    "similarity": SIMILARITY,
    "loss": LOSS,
}
