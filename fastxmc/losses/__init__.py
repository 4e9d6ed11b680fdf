"""Drop-in contrastive losses: ``from fastxmc.losses import info_nce, supcon``."""
from fastxmc.losses.infonce import InfoNCELoss, SupConLoss, info_nce, supcon

__all__ = ["info_nce", "supcon", "InfoNCELoss", "SupConLoss"]
