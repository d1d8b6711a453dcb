"""The methods, as data: one choice per aspect plus default hyperparameters.

A preset is nothing but a flat config; ``csl train --method yadim --encoder resnet18`` is this record with one
field overridden. Values come from the papers and the pl_bolts defaults (``../shared/notes/paper.md``); where a
paper's ImageNet value does not fit CIFAR-scale runs, the CIFAR value of the reference code is used and noted.
``docs/presets.md`` is the full table: per preset and aspect, the reference followed and every deviation left.

| method  | augment | encoder     | extract     | similarity          | loss      | target |
|---------|---------|-------------|-------------|---------------------|-----------|--------|
| amdim   | amdim   | amdim       | multiscale  | dot/√d, tclip 20    | amdim_nce | —      |
| cpc_v2  | cpc     | cpc_resnet  | cpc_context | dot (W_k in extract)| infonce   | —      |
| simclr  | simclr  | resnet50    | last_vector | cosine, τ 0.5       | infonce   | —      |
| byol    | byol    | resnet50    | last_vector+predictor | cosine, τ 1 | byol   | 0.996  |
| moco_v2 | moco_v2 | resnet50    | last_vector, one way | cosine, τ 0.2 | moco (queue only) | 0.999 |
| yadim   | yadim   | wide_resnet | last_map    | dot/√d, tclip 20    | amdim_nce | —      |
"""

from __future__ import annotations

from typing import Any

PRESETS: dict[str, dict[str, Any]] = {
    # Bachman et al. 2019, as amdim-public (train.py, model.py, costs.py, task_self_supervised.py) and pl_bolts'
    # amdim_module.py: comparisons 1:5, 1:7, 5:5 of the encoder's own n_rkhs embeddings (multiscale's head resolves
    # to none), dot ÷ √n_rkhs clipped by 20·tanh(s/20), NCE + 0.05·mean(raw s²), the two directions averaged and
    # the comparisons summed (Pairs.weight 1/2); Adam lr 2e-4, betas (0.8, 0.999), weight decay 1e-5, batch 200.
    # Where they disagree: tclip 20 (amdim-public; pl_bolts' module passes its tclip 20 nowhere, so its task runs
    # FeatureMapContrastiveTask's default 10), Adam eps 1e-8 (amdim-public; pl_bolts 1e-7: --adam_eps).
    # Not carried over: the 500-step linear LR warm-up and MultiStepLR (250, 280) of amdim-public's trainer.
    "amdim": {
        "augment": "amdim", "encoder": "amdim", "extract": "multiscale", "similarity": "dot", "loss": "amdim_nce",
        "comparisons": "1:5, 1:7, 5:5", "tclip": 20.0, "temperature": 1.0, "reg_weight": 0.05,
        "optimizer": "adam", "lr": 2e-4, "adam_beta1": 0.8, "adam_beta2": 0.999, "batch_size": 200,
        "weight_decay": 1e-5,
    },
    # Hénaff et al. 2019, appendix A.2 pseudocode CPC(latents, target_dim=64, emb_scale=0.1, steps_to_ignore=2,
    # steps_to_predict=3) with its 5-block pixelCNN (256 hidden): one offset, 3 rows ahead (the loop's one i = 2
    # predicts row r + i + 1), targets a 1×1 projection to 64, logits over all positions of all images. CPC's
    # bilinear score is the per-step head inside cpc_context, so the similarity is a plain dot (no √d, no clip).
    # Each patch augmented on its own (the paper's patch-based augmentation), with AMDIM's CIFAR ops.
    # pl_bolts CPC v2: Adam 1e-4, batch 128, 8×8 patches with overlap 4 at 32×32. Deviations: one direction,
    # south, as the pseudocode (the paper's text adds others: directions "south,north,east,west"); both views are
    # predicted and averaged (CPC has one view per image; the framework makes two).
    "cpc_v2": {
        "augment": "cpc", "encoder": "cpc_resnet", "extract": "cpc_context", "similarity": "dot", "loss": "infonce",
        "scale_by_dim": False, "temperature": 1.0, "per_patch": True,
        "steps_to_ignore": 2, "steps_to_predict": 3, "emb_scale": 0.1, "target_dim": 64, "context_blocks": 5,
        "context_hidden": 256, "directions": "south",
        "optimizer": "adam", "lr": 1e-4, "batch_size": 128, "weight_decay": 0.0,
    },
    # Chen et al. 2020; pl_bolts SimCLR CIFAR: τ 0.5, MLP head 2048→2048→128, Adam 1e-3, warm-up 10 epochs. The
    # simclr pipeline follows the image size: at 32 px jitter strength 0.5 and no blur (the paper's CIFAR-10
    # appendix, pl_bolts' simclr_module.py), above it 1.0 and blur p=0.5.
    "simclr": {
        "augment": "simclr", "encoder": "resnet50", "extract": "last_vector", "similarity": "cosine",
        "loss": "infonce", "head": "mlp", "proj_hidden": 2048, "proj_dim": 128, "temperature": 0.5,
        "optimizer": "adam", "lr": 1e-3, "batch_size": 256, "weight_decay": 1e-6, "warmup_epochs": 10,
    },
    # Grill et al. 2020: projection 4096→256 and predictor, 2 − 2·cos, τ_EMA 0.996 → 1 on a cosine; LARS lr 0.2,
    # weight decay 1.5e-6 (pl_bolts used Adam by mistake).
    "byol": {
        "augment": "byol", "encoder": "resnet50", "extract": "last_vector", "similarity": "cosine", "loss": "byol",
        "head": "mlp", "proj_hidden": 4096, "proj_dim": 256, "predictor": True, "pred_hidden": 4096,
        "temperature": 1.0, "target_momentum": 0.996, "target_momentum_final": 1.0,
        "optimizer": "lars", "lr": 0.2, "batch_size": 256, "weight_decay": 1.5e-6, "warmup_epochs": 10,
    },
    # Chen et al. 2020 (MoCo v2), facebookresearch/moco: main_moco.py with `--mlp --moco-t 0.2 --aug-plus --cos`
    # (τ 0.2, key momentum 0.999, SGD lr 0.03 for batch 256, momentum 0.9, wd 1e-4 on every parameter, cosine, no
    # warm-up) and moco/builder.py: one query → key loss per step (symmetric False), the negatives the queue's
    # only (batch_negatives False), the head Linear → ReLU → Linear at the encoder's width (mlp_nobn; proj_hidden
    # left to the encoder), 128-d keys. The key encoder is the EMA target, in a pass of its own over the key view.
    # Deviations, for CIFAR-scale single-device runs: the queue holds 4,096 keys (the CIFAR demo's, colab/
    # moco_cifar10_demo.ipynb, which finds it saturates there; ImageNet's 65,536 exceeds CIFAR-10's 50,000 images)
    # and Shuffle-BN over 8 GPUs of 32 images becomes the demo's batch norm over 8 sub-batches (bn_splits 8, with
    # the key batch shuffled); the cosine is per step, not per epoch.
    "moco_v2": {
        "augment": "moco_v2", "encoder": "resnet50", "extract": "last_vector", "similarity": "cosine",
        "loss": "moco", "head": "mlp_nobn", "proj_dim": 128, "temperature": 0.2, "symmetric": False,
        "queue_size": 4096, "batch_negatives": False, "bn_splits": 8, "encode_views": "separate",
        "target_momentum": 0.999, "target_momentum_final": 0.999,
        "optimizer": "sgd", "lr": 0.03, "sgd_momentum": 0.9, "batch_size": 256, "weight_decay": 1e-4,
    },
    # Falcon & Cho 2020: AMDIM+CPC augmentation (their union is AMDIM's recipe, no crop at 32 px), wide ResNet-34,
    # last-layer feature-map comparison with no head (pl_bolts' FeatureMapContrastiveTask scores the encoder's
    # maps), dot product, NCE. Optimiser as AMDIM's in pl_bolts' amdim_module.py, whose framework YADIM ran: Adam
    # betas (0.8, 0.999), weight decay 1e-5.
    "yadim": {
        "augment": "yadim", "encoder": "wide_resnet", "extract": "last_map", "similarity": "dot", "loss": "amdim_nce",
        "tclip": 20.0, "temperature": 1.0, "reg_weight": 0.05,
        "optimizer": "adam", "lr": 2e-4, "adam_beta1": 0.8, "adam_beta2": 0.999, "batch_size": 200,
        "weight_decay": 1e-5,
    },
}
