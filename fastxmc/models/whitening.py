"""Sentence-embedding whitening: a fixed linear map fitted once to the training captions.

Why: a frozen encoder's mean-pooled sentence embeddings of one dataset share most of their
direction. On the shapes captions (all-MiniLM-L6-v2) "a red square at the top left" and "... at the
bottom right" have cosine 0.97, while a colour change gives 0.80 and a shape change 0.65: the
position words move the embedding by a few percent of its length, and a network reading it must
first amplify that direction by an order of magnitude. ZCA whitening with shrinkage,

    w(s) = (s - mean) V diag(1 / sqrt(lambda + eps)) V^T * c,   eps = shrinkage * mean(lambda),

(V, lambda: the eigenvectors and eigenvalues of the captions' covariance) gives every direction the
data varies in about the same weight (position pairs 0.68, colour 0.58, shape 0.32 at shrinkage
0.01). ``c`` rescales so the whitened embeddings keep the centred embeddings' mean squared norm: the
map only redistributes variance, so the layers reading it keep their initial scale. The shrinkage
bounds the gain of directions the data hardly varies in (noise).

The mean and the matrix are buffers: they travel with the model's state_dict (checkpoints, G_ema,
``fastxmc.sample``). Before :meth:`SentenceWhitening.fit` the map is the identity.
"""
from __future__ import annotations

import torch
from torch import nn

DEFAULT_SHRINKAGE = 0.01


class SentenceWhitening(nn.Module):
    """``forward(s) = (s - mean) @ matrix`` for s (B, text_dim); fitted by :meth:`fit`."""

    def __init__(self, text_dim: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(text_dim))
        self.register_buffer("matrix", torch.eye(text_dim))

    @torch.no_grad()
    def fit(self, sentences: torch.Tensor, shrinkage: float = DEFAULT_SHRINKAGE) -> "SentenceWhitening":
        """Fit to ``sentences`` (N, text_dim), N >= 2, in float64; returns self."""
        dim = self.mean.shape[0]
        if not isinstance(sentences, torch.Tensor) or sentences.dim() != 2 or sentences.shape[1] != dim:
            shape = tuple(sentences.shape) if isinstance(sentences, torch.Tensor) else type(sentences).__name__
            raise ValueError(f"sentences must have shape (N, {dim}), got {shape}")
        if sentences.shape[0] < 2:
            raise ValueError(f"fitting the whitening needs at least 2 sentences, got {sentences.shape[0]}")
        if not shrinkage > 0:
            raise ValueError(f"shrinkage must be positive, got {shrinkage}")
        s = sentences.detach().to(torch.float64)
        mean = s.mean(dim=0)
        centred = s - mean
        cov = centred.T @ centred / (s.shape[0] - 1)
        evals, evecs = torch.linalg.eigh(cov)
        evals = evals.clamp_min(0.0)
        eps = shrinkage * evals.mean().clamp_min(torch.finfo(torch.float64).tiny)
        matrix = evecs @ torch.diag((evals + eps).rsqrt()) @ evecs.T
        # keep E||centred||^2: trace(cov) before, trace(M^T cov M) after
        after = torch.sum(evals / (evals + eps))
        matrix = matrix * torch.sqrt(evals.sum() / after.clamp_min(torch.finfo(torch.float64).tiny))
        self.mean.copy_(mean.to(self.mean.dtype))
        self.matrix.copy_(matrix.to(self.matrix.dtype))
        return self

    def forward(self, sentence: torch.Tensor) -> torch.Tensor:
        return (sentence - self.mean.to(sentence.dtype)) @ self.matrix.to(sentence.dtype)
