"""Aspect 3, representation extraction: which embeddings are compared, and which pairs are positives.

An extraction is an ``nn.Module`` built from the encoder's declared sizes (``vector_dim``, ``map_channels``) with:
- ``out_dim``: the size of the embeddings it compares (the similarity is built for it);
- ``embed(features) -> dict[str, Tensor]``: the learned heads; a momentum target keeps an EMA copy of this part;
- ``pairs(online_a, online_b, target_a, target_b) -> list[Pairs]``: the comparisons; ``target_*`` are None when
  the model has no momentum target. Online-only parts (a predictor, a context network) live here.
- ``one_way`` (optional, default False): True declares that only view a's anchors meet view b's candidates; a
  model with a momentum target then encodes view a online and view b in the target only, and passes
  ``online_b`` and ``target_a`` as None (MoCo's one query pass and one key pass).

To add one: a new module in this package with a builder decorated ``@EXTRACT.register("name")``; modules here are
imported automatically.
"""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
