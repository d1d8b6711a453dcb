"""csl: contrastive self-supervised learning as five composable aspects (Falcon & Cho 2020).

Where things live, one module or package per aspect, each a registry of named choices (``csl.registry``):
  augment/     1. data augmentation pipelines (batched, per-sample random parameters, on the device)
  encoders/    2. encoders (ResNets, wide ResNet, AMDIM's, CPC's), each with a width multiplier
  extract/     3. representation extraction (last_vector, multiscale, cpc_context, last_map)
  similarity.py 4. similarity measures (dot, cosine, bilinear)
  loss.py      5. losses (infonce, amdim_nce, byol, moco, triplet)
Methods are presets of those choices (``presets.py``); ``model.py`` composes them, ``train.py`` trains,
``evaluate.py`` measures.
"""

from csl import augment, encoders, extract, loss, similarity  # noqa: F401  (registers every choice)
from csl.config import resolve
from csl.presets import PRESETS
from csl.registry import ASPECTS, ChoiceError

__all__ = ["ASPECTS", "PRESETS", "ChoiceError", "resolve"]
