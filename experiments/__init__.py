"""Robustness studies over the CSL design space (Falcon & Cho 2020), run with csl-search and read back from MLflow.

- ``encoder_robustness``    every method preset × a set of encoders × seeds, fixed budget, no early stopping;
- ``extraction_robustness`` every method preset × every extraction strategy it can take × seeds;
- ``rediscover_yadim``      an early-stopped search over the whole space, then its top combinations and the six
                            presets re-evaluated across encoders and extractions, ranked by robustness;
- ``label_free``            the label-free selection metrics validated against labels: their rank correlation with
                            kNN / linear accuracy within and across methods, and the regret of selecting by them
                            (statistics and report: ``label_free_report``);
- ``report``                ``csl-search report <experiment or parent run>``: Markdown + plots, logged to MLflow;
- ``stats``                 bootstrap intervals over seeds, ranking with ties, Spearman rank correlation;
- ``common`` / ``spaces``   what the studies share: scales, the study run in MLflow / the generated grid spaces.

Run a study: ``python -m experiments.encoder_robustness --scale smoke``.
"""
