"""The augmentation aspect: batched, per-sample random views made on the images' device.

Importing the package imports every module in it, so a pipeline registered with ``@AUGMENT.register`` in a new
file here is available without editing this one.
"""

from __future__ import annotations

import importlib
import pkgutil

from csl.augment.pipelines import Pipeline
from csl.augment.views import ViewSpec

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["Pipeline", "ViewSpec"]
