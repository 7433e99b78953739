"""ARKV's attention statistics (shared/ARKV.md sections 1 and 2), on plain tensors.

Shapes: `a` is attention weights [B, Hq, q, K] (float32) of q queries over K keys.
Every statistic is returned per batch row, so rows of a batch never influence each other.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

POOLINGS = ("avg", "max")


def entropy(a: torch.Tensor) -> torch.Tensor:
    """H = -sum A' log(A' + 1e-10), summed over heads, queries and keys -> [B]."""
    return -(a * torch.log(a + 1e-10)).sum(dim=(1, 2, 3))


def variance(a: torch.Tensor) -> torch.Tensor:
    """V = sum over keys and heads of the (unbiased) variance across the queries -> [B]."""
    if a.shape[2] < 2:
        return a.new_zeros(a.shape[0])
    return a.var(dim=2).sum(dim=(1, 2))


def kurtosis(a: torch.Tensor) -> torch.Tensor:
    """K = sum over keys and heads of m4 / m2^2 across the queries (Pearson, no -3; m2 >= 1e-8) -> [B]."""
    centred = a - a.mean(dim=2, keepdim=True)
    m2 = centred.pow(2).mean(dim=2).clamp_min(1e-8)
    m4 = centred.pow(4).mean(dim=2)
    return (m4 / m2.pow(2)).sum(dim=(1, 2))


def oq_score(a: torch.Tensor, tau1: float, tau2: float, tau3: float) -> torch.Tensor:
    """OQ = H^(1/tau1) * V^(1/tau2) * K^(1/tau3) of window queries x non-window keys -> [B]."""
    return entropy(a).pow(1 / tau1) * variance(a).pow(1 / tau2) * kurtosis(a).pow(1 / tau3)


def oq_ratios(scores: torch.Tensor) -> torch.Tensor:
    """[L, B] OQ scores -> ratios to the max over ALL layers (not the layers seen so far)."""
    top = scores.max(dim=0, keepdim=True).values
    return torch.where(top > 0, scores / top.clamp_min(1e-30), torch.ones_like(scores))


def heavy_hitter_score(a: torch.Tensor, gamma: float, pooling: str, kernel_size: int, kv_heads: int
                       ) -> torch.Tensor:
    """s = mean_q A + gamma var_q A, pooled over neighbouring keys, averaged per KV group -> [B, Hkv, K]."""
    s = a.mean(dim=2)
    if a.shape[2] > 1:
        s = s + gamma * a.var(dim=2)
    b, hq, k = s.shape
    flat = s.reshape(b * hq, 1, k)
    if kernel_size > 1:
        pool = F.avg_pool1d if pooling == "avg" else F.max_pool1d
        flat = pool(flat, kernel_size, stride=1, padding=kernel_size // 2)
    return flat.view(b, kv_heads, hq // kv_heads, k).mean(dim=2)
