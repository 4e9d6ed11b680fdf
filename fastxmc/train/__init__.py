"""The training engine: ``python -m fastxmc.train`` (XMC-GAN and the label-guided extension).

- :mod:`fastxmc.train.config`: typed config sections, presets, ``--section.key=value`` overrides.
- :mod:`fastxmc.train.losses`: the XMC-GAN loss set (and the SupCon extension).
- :mod:`fastxmc.train.loop`: the training loop (:func:`train`).
- :mod:`fastxmc.train.checkpoint`, :mod:`fastxmc.train.ema`, :mod:`fastxmc.train.logging`,
  :mod:`fastxmc.train.samples`, :mod:`fastxmc.train.distributed`: run management.
"""
from fastxmc.train.checkpoint import load_run
from fastxmc.train.config import TrainConfig, build_config
from fastxmc.train.loop import NonFiniteLossError, RunResult, train

__all__ = ["train", "TrainConfig", "build_config", "load_run", "RunResult", "NonFiniteLossError"]
