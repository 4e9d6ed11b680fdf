"""Experiments built from the engine's commands: ``python -m fastxmc.experiments ablation``.

:mod:`fastxmc.experiments.ablation` reproduces XMC-GAN's contrastive-loss ablation on the embedded
shapes dataset (pretrain the evaluator, train every variant, evaluate, write the report).
"""
