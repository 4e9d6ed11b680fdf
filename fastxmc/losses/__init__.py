"""Drop-in contrastive losses: ``from fastxmc.losses import info_nce, supcon, region_word_loss``."""
from fastxmc.losses.infonce import InfoNCELoss, SupConLoss, info_nce, supcon
from fastxmc.losses.region_word import region_word_loss

__all__ = ["info_nce", "supcon", "region_word_loss", "InfoNCELoss", "SupConLoss"]
