"""The encoder aspect: builders registered in ``csl.registry.ENCODER``.

Every module of this package is imported here, so a new file with an ``@ENCODER.register(...)`` builder is a new
choice with no other edit. A built encoder maps an N×3×H×W float batch to ``csl.types.Features`` and declares
``vector_dim`` and ``map_channels`` at construction.
"""

from __future__ import annotations

import importlib
import pkgutil

from csl.registry import ENCODER

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["ENCODER"]
