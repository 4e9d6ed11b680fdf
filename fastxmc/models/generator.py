"""XMC-GAN generator (docs/design.md, "Generator", checked against the authors' ``xmc_net.Generator``).

    gc    = concat(Linear(text_dim -> z_dim)(sentence), z)                 (B, 2 z_dim) global condition
    x     = Linear(z_dim -> 16w * 4 * 4)(z) -> (B, 16w, 4, 4)               the stem sees z only
            (ours, ``text_stem=True``: Linear(2 z_dim -> 16w * 4 * 4)(gc), the sentence lays out the 4x4 map)
    2 up-blocks with self-modulation BN (per channel, from gc)             4x4 -> 16x16
    q     = conv1x1(text_dim)(x) at 16x16 -> 256 region queries
    c     = word_attention(q, words, word_mask, rho=15)                     (B, 256, text_dim)
    cond  = concat(c, tile(gc)) -> (B, text_dim + 2 z_dim, 16, 16)         spatial condition
    up-blocks with per-pixel modulation (gamma, beta = conv1x1(cond), cond nearest-resized)
    MBN -> ReLU -> conv3x3(3) -> tanh -> (x + 1) / 2                        images in [0, 1]

``coords=True`` (ours, off by default) appends x/y coordinate channels to the input of the query conv,
so each region's query, and with it which words it attends to, can depend on where the region is:
the attention can then send "left" to the left half of the map, which per-channel gains and the
z-only layout cannot express.

Why ``text_stem``: in the reference the sentence reaches the first two blocks only through per-channel
(spatially uniform) BN gains, and the per-pixel modulation only from 16x16 on, with queries computed
from the z-only layout. A caption that names a position ("at the top left") then has to be served by
amplifying channels that happen to sit there. On the shapes data G learned colours and sizes but left
positions at chance while D told them apart on real images (docs/results.md, "The game and the layout"); letting
the stem read the sentence gives the 4x4 layout a direct input. Off by default (the paper's G).

No spectral norm; Glorot-normal weights, zero biases. BN running statistics are used in eval mode.
With ``attention_every_block=True`` every per-pixel block recomputes the attention from its own input
(the paper's description; the code, and the default, compute it once at 16x16); the output norm then
uses the last block's condition.

Channel multipliers of the up-blocks' outputs (the stem has 16w channels at 4x4):
    32: 16, 8, 4        64: 16, 8, 4, 2        128: 16, 8, 4, 2, 1 (code)        256: 16, 8, 8, 4, 2, 1 (code)
32 and 64 are ours: the 128 model truncated, so every spatial size keeps the 128 model's width.
"""
from __future__ import annotations

import torch
from torch import nn

from fastxmc.models.blocks import UpBlock, conv1x1, conv3x3, init_glorot_, with_coordinates
from fastxmc.models.modulation import SpatialModulationBN
from fastxmc.models.whitening import SentenceWhitening
from fastxmc.ops import word_attention

G_MULTIPLIERS = {32: (16, 8, 4), 64: (16, 8, 4, 2), 128: (16, 8, 4, 2, 1), 256: (16, 8, 8, 4, 2, 1)}
STEM_MULTIPLIER = 16
SELF_MODULATED_BLOCKS = 2  # 4x4 -> 8x8 -> 16x16: attention starts at 16x16


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _check_tensor(name: str, t, shape: tuple, layout: str, floating: bool = True) -> None:
    """``t`` is a tensor of ``shape`` (None entries: any size); ``layout`` names the axes."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {layout}, got {type(t).__name__}")
    if t.dim() != len(shape) or any(s is not None and s != n for s, n in zip(shape, t.shape)):
        raise ValueError(f"{name} must have shape {layout} = {shape}, got {tuple(t.shape)}")
    if floating and not t.dtype.is_floating_point:
        raise TypeError(f"{name} must be a float tensor, got {t.dtype}")


class Generator(nn.Module):
    """G(z, sentence, words, word_mask) -> images (B, 3, resolution, resolution) in [0, 1].

    Args:
        resolution: 32, 64, 128 or 256.
        text_dim: width of the sentence and word embeddings (768 for BERT-base, 384 for MiniLM).
        z_dim: noise width (128).
        width: base channel width gf (96; smaller for the CPU presets).
        rho: sharpness of the word attention softmax (15).
        attention_every_block: recompute the word attention in every per-pixel block (default: once).
        text_stem: the 4x4 stem reads concat(sentence projection, z) instead of z (see above).
        coords: coordinate channels in the word-attention queries (see above).
        whiten_sentence: read the sentence through a :class:`SentenceWhitening` (fitted by the
            trainer to the training captions; ours, off by default).
    """

    def __init__(self, resolution: int, text_dim: int, z_dim: int = 128, width: int = 96, *,
                 rho: float = 15.0, attention_every_block: bool = False, text_stem: bool = False,
                 coords: bool = False, whiten_sentence: bool = False):
        super().__init__()
        if resolution not in G_MULTIPLIERS:
            raise ValueError(f"resolution must be one of {sorted(G_MULTIPLIERS)}, got {resolution!r}")
        for name, value in (("text_dim", text_dim), ("z_dim", z_dim), ("width", width)):
            _check_positive_int(name, value)
        self.resolution, self.text_dim, self.z_dim, self.width = resolution, text_dim, z_dim, width
        self.rho, self.attention_every_block = float(rho), bool(attention_every_block)
        self.text_stem, self.coords = bool(text_stem), bool(coords)
        channels = [STEM_MULTIPLIER * width] + [m * width for m in G_MULTIPLIERS[resolution]]
        cond_dim, spatial_dim = 2 * z_dim, text_dim + 2 * z_dim
        self.whitening = SentenceWhitening(text_dim) if whiten_sentence else None
        self.sentence_proj = nn.Linear(text_dim, z_dim)
        self.stem = nn.Linear(cond_dim if self.text_stem else z_dim, channels[0] * 4 * 4)
        pairs = list(zip(channels[:-1], channels[1:]))
        self.global_blocks = nn.ModuleList(
            UpBlock(i, o, cond_dim, spatial=False) for i, o in pairs[:SELF_MODULATED_BLOCKS])
        self.spatial_blocks = nn.ModuleList(
            UpBlock(i, o, spatial_dim, spatial=True) for i, o in pairs[SELF_MODULATED_BLOCKS:])
        # One query conv at 16x16, or one per per-pixel block (on that block's input).
        query_inputs = [i for i, _ in pairs[SELF_MODULATED_BLOCKS:]]
        if not self.attention_every_block:
            query_inputs = query_inputs[:1]
        self.queries = nn.ModuleList(conv1x1(c + 2 * self.coords, text_dim) for c in query_inputs)
        self.out_norm = SpatialModulationBN(channels[-1], spatial_dim)
        self.to_rgb = conv3x3(channels[-1], 3)
        init_glorot_(self)

    def _check_inputs(self, z, sentence, words, word_mask) -> None:
        _check_tensor("z", z, (None, self.z_dim), "(B, z_dim)")
        batch = z.shape[0]
        _check_tensor("sentence", sentence, (batch, self.text_dim), "(B, text_dim)")
        _check_tensor("words", words, (batch, None, self.text_dim), "(B, T, text_dim)")
        _check_tensor("word_mask", word_mask, (batch, words.shape[1]), "(B, T)", floating=False)
        if word_mask.dtype != torch.bool:
            raise TypeError(f"word_mask must be a bool tensor (True = real token), got {word_mask.dtype}")

    def _spatial_condition(self, query: nn.Module, x, global_cond, words, word_mask) -> torch.Tensor:
        """concat(word context, tiled global condition): (B, text_dim + 2 z_dim, H, W) at x's size."""
        q = query(with_coordinates(x) if self.coords else x)           # (B, d, H, W)
        b, d, h, w = q.shape
        regions = q.flatten(2).transpose(1, 2)                         # (B, H*W, d), r = row*W + col
        context = word_attention(regions, words.to(q.dtype), word_mask, rho=self.rho)
        context = context.transpose(1, 2).reshape(b, d, h, w)
        tiled = global_cond.to(q.dtype)[:, :, None, None].expand(-1, -1, h, w)
        return torch.cat([context, tiled], dim=1)

    def forward(self, z: torch.Tensor, sentence: torch.Tensor, words: torch.Tensor,
                word_mask: torch.Tensor) -> torch.Tensor:
        """z (B, z_dim), sentence (B, text_dim), words (B, T, text_dim), word_mask (B, T) bool
        -> images (B, 3, resolution, resolution) in [0, 1]."""
        self._check_inputs(z, sentence, words, word_mask)
        if self.whitening is not None:
            sentence = self.whitening(sentence)
        global_cond = torch.cat([self.sentence_proj(sentence), z], dim=1)
        # (B, 16w*16) -> (B, 16w, 4, 4): the reference reshapes channels-last, a mere permutation of
        # the stem's output units for a freshly initialised network.
        x = self.stem(global_cond if self.text_stem else z).view(z.shape[0], -1, 4, 4)
        for block in self.global_blocks:
            x = block(x, global_cond)
        for index, block in enumerate(self.spatial_blocks):
            if index < len(self.queries):  # always at 16x16; every block with attention_every_block
                cond = self._spatial_condition(self.queries[index], x, global_cond, words, word_mask)
            x = block(x, cond)
        x = self.out_norm(x, cond, relu=True)
        return (torch.tanh(self.to_rgb(x)) + 1.0) / 2.0
