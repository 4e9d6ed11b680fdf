"""The dual encoder: an image tower and a text tower embedding into one space.

It is the first phase of the two-phase recipe (docs/design.md, "Label-guided extension": DAMSM-style sentence and
word losses, plus the label-guided SupCon terms, trained by ``python -m fastxmc.pretrain``) and
the evaluator's instrument (R-precision, and ``fid_dual`` when no Inception weights are given).

- :class:`ImageEncoder`: images (B, 3, H, W) in [0, 1] -> :class:`ImageEncoding`:
  ``regions`` (B, R, E) from a ``region_size`` x ``region_size`` map (R = region_size^2, at most
  16 x 16 as XMC-GAN's region features), ``global_feature`` (B, E), and ``pooled`` (B, C), the
  average-pooled last feature map before the projection (the ``fid_dual`` feature space).
- :class:`TextEncoder`: the cached frozen token embeddings of the data pipeline (``sentence``
  (B, D), ``words`` (B, T, D), ``word_mask`` (B, T) bool) -> :class:`TextEncoding`: ``words``
  (B, T, E) and ``sentence`` (B, E). With ``text_layers = 0`` a trainable projection of each;
  with ``text_layers > 0`` a small trainable transformer over the projected words, the sentence
  being the masked mean of its outputs.
- :class:`DualEncoder`: both towers, ``similarity`` (cosine, for R-precision), ``save`` / ``load``.

Normalisation is GroupNorm / LayerNorm only, so an encoding never depends on the rest of its batch:
evaluation gives the same numbers at any batch size. Padded word positions come out as zeros.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from fastxmc.atomic import atomic_torch_save, state_digest

__all__ = ["DualEncoderConfig", "ImageEncoding", "TextEncoding", "ImageEncoder", "TextEncoder",
           "DualEncoder", "DUAL_ENCODER_FILE"]

CHECKPOINT_FORMAT = "fastxmc-dual-encoder-v1"
# The model file of a pretrain run directory (what --dual and loss.image_classifier_weights take).
DUAL_ENCODER_FILE = "dual_encoder.pt"


@dataclass(frozen=True)
class DualEncoderConfig:
    """Architecture of both towers (stored in checkpoints)."""
    resolution: int = 64        # image side
    text_dim: int = 384         # width of the cached frozen token embeddings (MiniLM: 384)
    embed_dim: int = 256        # shared embedding width E
    width: int = 64             # channels of the first image stage (doubling per stage, capped at 8x)
    region_size: int = 16       # side of the region map (R = region_size^2 regions)
    text_layers: int = 0        # 0: projection only; > 0: transformer layers over the words
    text_heads: int = 4
    max_tokens: int = 64        # positional embeddings of the transformer (T must not exceed it)
    dropout: float = 0.0

    def __post_init__(self):
        for name in ("resolution", "text_dim", "embed_dim", "width", "region_size", "text_heads",
                     "max_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        ratio = self.resolution // self.region_size
        if not (4 <= self.region_size <= 16) or self.resolution % self.region_size or ratio & (ratio - 1):
            raise ValueError(f"region_size must be in [4, 16] and resolution / region_size a power of "
                             f"two, got resolution={self.resolution} region_size={self.region_size}")
        if self.text_layers < 0 or not (0.0 <= self.dropout < 1.0):
            raise ValueError(f"text_layers must be >= 0 and dropout in [0, 1), got "
                             f"{self.text_layers} and {self.dropout}")
        if self.text_layers and self.embed_dim % self.text_heads:
            raise ValueError(f"embed_dim ({self.embed_dim}) must be divisible by text_heads "
                             f"({self.text_heads})")


class ImageEncoding(NamedTuple):
    regions: torch.Tensor          # (B, R, E)
    global_feature: torch.Tensor   # (B, E)
    pooled: torch.Tensor           # (B, C) average-pooled features before the projection


class TextEncoding(NamedTuple):
    words: torch.Tensor            # (B, T, E), zeros at padding
    sentence: torch.Tensor         # (B, E)


# ---------------------------------------------------------------------------- image tower
def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(32, channels // 4) or 1, channels)


class _DownBlock(nn.Module):
    """Residual block halving the resolution: conv3x3/2 -> GN -> ReLU -> conv3x3 -> GN, plus
    avgpool2 -> conv1x1 shortcut, then ReLU."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, 2, 1, bias=False)
        self.norm1 = _group_norm(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.norm2 = _group_norm(c_out)
        self.shortcut = nn.Conv2d(c_in, c_out, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.norm1(self.conv1(x)))
        h = self.norm2(self.conv2(h))
        return F.relu(h + self.shortcut(F.avg_pool2d(x, 2)))


def _stage_widths(width: int, stages: int) -> list:
    return [width * 2 ** min(i + 1, 3) for i in range(stages)]


class ImageEncoder(nn.Module):
    """CNN: stem conv at full resolution, stride-2 residual blocks down to the region map
    (``region_size``), a conv1x1 to E for the regions, more blocks down to 4x4 (at least one),
    average pooling and a linear projection to E for the global feature."""

    def __init__(self, cfg: DualEncoderConfig):
        super().__init__()
        self.resolution = cfg.resolution
        to_regions = int(math.log2(cfg.resolution // cfg.region_size))
        to_global = max(int(math.log2(cfg.region_size // 4)), 1)
        widths = _stage_widths(cfg.width, to_regions + to_global)
        self.stem = nn.Sequential(nn.Conv2d(3, cfg.width, 3, 1, 1, bias=False), _group_norm(cfg.width),
                                  nn.ReLU())
        chans = [cfg.width] + widths
        blocks = [_DownBlock(chans[i], chans[i + 1]) for i in range(len(widths))]
        self.to_region_map = nn.Sequential(*blocks[:to_regions])
        self.region_proj = nn.Conv2d(chans[to_regions], cfg.embed_dim, 1)
        self.to_global_map = nn.Sequential(*blocks[to_regions:])
        self.global_proj = nn.Linear(chans[-1], cfg.embed_dim)
        self.pooled_dim = chans[-1]

    def forward(self, images: torch.Tensor) -> ImageEncoding:
        if images.dim() != 4 or images.shape[1] != 3 or \
                images.shape[-2:] != (self.resolution, self.resolution) or not images.is_floating_point():
            raise ValueError(f"images must be float (B, 3, {self.resolution}, {self.resolution}) in "
                             f"[0, 1], got {tuple(images.shape)} {images.dtype}")
        region_map = self.to_region_map(self.stem(images * 2 - 1))
        regions = self.region_proj(region_map).flatten(2).transpose(1, 2)      # (B, R, E)
        pooled = self.to_global_map(region_map).mean((2, 3))                   # (B, C)
        return ImageEncoding(regions, self.global_proj(pooled), pooled)


# ---------------------------------------------------------------------------- text tower
def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T, E), (B, T) bool -> (B, E) mean over the True positions."""
    weights = mask.to(x.dtype).unsqueeze(-1)
    return (x * weights).sum(1) / weights.sum(1).clamp(min=1)


class TextEncoder(nn.Module):
    """Trainable head over frozen token embeddings (see the module docstring)."""

    def __init__(self, cfg: DualEncoderConfig):
        super().__init__()
        self.text_dim, self.max_tokens = cfg.text_dim, cfg.max_tokens
        self.word_proj = nn.Linear(cfg.text_dim, cfg.embed_dim)
        self.transformer = None
        if cfg.text_layers:
            self.positions = nn.Parameter(torch.randn(cfg.max_tokens, cfg.embed_dim) * 0.02)
            layer = nn.TransformerEncoderLayer(cfg.embed_dim, cfg.text_heads, 4 * cfg.embed_dim,
                                               cfg.dropout, batch_first=True, norm_first=True)
            self.transformer = nn.TransformerEncoder(layer, cfg.text_layers, enable_nested_tensor=False)
            self.final_norm = nn.LayerNorm(cfg.embed_dim)
            self.sentence_proj = nn.Linear(cfg.embed_dim, cfg.embed_dim)
        else:
            self.sentence_proj = nn.Linear(cfg.text_dim, cfg.embed_dim)

    def _check(self, sentence, words, word_mask) -> None:
        if words.dim() != 3 or words.shape[2] != self.text_dim or not words.is_floating_point():
            raise ValueError(f"words must be float (B, T, {self.text_dim}), got "
                             f"{tuple(words.shape)} {words.dtype}")
        b, t = words.shape[:2]
        if sentence.shape != (b, self.text_dim):
            raise ValueError(f"sentence must be (B, {self.text_dim}) = ({b}, {self.text_dim}), got "
                             f"{tuple(sentence.shape)}")
        if word_mask.shape != (b, t) or word_mask.dtype != torch.bool:
            raise ValueError(f"word_mask must be bool ({b}, {t}), got {tuple(word_mask.shape)} "
                             f"{word_mask.dtype}")
        if not word_mask.any(1).all():
            raise ValueError("word_mask: every caption needs at least one real token")
        if self.transformer is not None and t > self.max_tokens:
            raise ValueError(f"captions have T = {t} tokens but max_tokens is {self.max_tokens}")

    def forward(self, sentence: torch.Tensor, words: torch.Tensor, word_mask: torch.Tensor) -> TextEncoding:
        self._check(sentence, words, word_mask)
        mask = word_mask.unsqueeze(-1)
        h = self.word_proj(words)
        if self.transformer is None:
            return TextEncoding(h * mask, self.sentence_proj(sentence))
        h = h + self.positions[: h.shape[1]]
        h = self.final_norm(self.transformer(h, src_key_padding_mask=~word_mask)) * mask
        return TextEncoding(h, self.sentence_proj(_masked_mean(h, word_mask)))


# ---------------------------------------------------------------------------- both towers
class DualEncoder(nn.Module):
    """Image and text towers of one :class:`DualEncoderConfig`."""

    def __init__(self, cfg: DualEncoderConfig | None = None):
        super().__init__()
        self.config = cfg or DualEncoderConfig()
        self.image_encoder = ImageEncoder(self.config)
        self.text_encoder = TextEncoder(self.config)

    def at_resolution(self, images: torch.Tensor, antialias: bool = True) -> torch.Tensor:
        """``images`` resized (bilinear) to the resolution the encoder was trained at; as they are
        when they already have it."""
        size = self.config.resolution
        if images.shape[-2:] == (size, size):
            return images
        return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False,
                             antialias=antialias)

    def encode_image(self, images: torch.Tensor) -> ImageEncoding:
        return self.image_encoder(images)

    def encode_text(self, sentence: torch.Tensor, words: torch.Tensor,
                    word_mask: torch.Tensor) -> TextEncoding:
        return self.text_encoder(sentence, words, word_mask)

    def forward(self, images, sentence, words, word_mask) -> tuple:
        """(ImageEncoding, TextEncoding) of a batch of (image i, caption i) pairs."""
        return self.encode_image(images), self.encode_text(sentence, words, word_mask)

    def similarity(self, images, sentence, words, word_mask) -> torch.Tensor:
        """(N_images, N_captions) cosine similarity of the global image features and the sentence
        embeddings (the R-precision score)."""
        image = F.normalize(self.encode_image(images).global_feature, dim=-1)
        text = F.normalize(self.encode_text(sentence, words, word_mask).sentence, dim=-1)
        return image @ text.T

    def save(self, path) -> Path:
        """Write config, weights and their digest atomically (:mod:`fastxmc.atomic`)."""
        payload = {"format": CHECKPOINT_FORMAT, "config": dataclasses.asdict(self.config),
                   "state_dict": self.state_dict()}
        payload["digest"] = state_digest(payload)
        return atomic_torch_save(payload, path)

    @classmethod
    def load(cls, path, map_location="cpu") -> "DualEncoder":
        """A model written by :meth:`save` (``weights_only=True``, digest verified), in eval mode."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"dual encoder checkpoint {path} not found")
        try:
            payload = torch.load(path, map_location=map_location, weights_only=True)
        except Exception as err:  # a damaged zip archive or pickle, reported in many ways
            raise ValueError(f"dual encoder checkpoint {path} is unreadable ({type(err).__name__}: "
                             f"{(str(err).strip().splitlines() or [''])[0][:200]})") from err
        if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{path} is not a dual encoder checkpoint (format {CHECKPOINT_FORMAT})")
        if "digest" in payload and payload["digest"] != state_digest(payload):
            raise ValueError(f"dual encoder checkpoint {path} is corrupt: its contents do not match "
                             "its digest")
        model = cls(DualEncoderConfig(**payload["config"]))
        model.load_state_dict(payload["state_dict"])
        return model.eval()
