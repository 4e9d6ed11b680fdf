"""Dual-encoder pretraining: ``python -m fastxmc.pretrain`` (the first phase of the two-phase
recipe, docs/design.md, "Label-guided extension", and the evaluator's encoder).

- :mod:`fastxmc.pretrain.config`: sections, presets and overrides (train's machinery).
- :mod:`fastxmc.pretrain.loop`: the loop (:func:`pretrain`), writing ``DIR/dual_encoder.pt``.
"""
from fastxmc.pretrain.config import PretrainConfig, build_config
from fastxmc.pretrain.loop import MODEL_FILE, PretrainResult, pretrain

__all__ = ["pretrain", "PretrainConfig", "build_config", "PretrainResult", "MODEL_FILE"]
