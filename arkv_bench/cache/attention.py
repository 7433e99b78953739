"""The one attention hook shared by every architecture.

Methods that score tokens need the query and the keys that attention already has. Instead
of copying any model's forward, we register an attention function named `arkv` with
transformers' `AttentionInterface`. A cache layer that wants to see the attention marks
itself "pending" in its `update()` (which the model calls right before attention); the
hook hands that layer the query, keys, values and mask, and the layer computes attention
(SDPA) and then compresses. Layers that never mark themselves (the `full` method) go
straight to SDPA: no extra work.
"""

from __future__ import annotations

import threading
from typing import Any, Protocol

import torch
from torch.nn.attention.bias import causal_lower_right
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

ATTN_NAME = "arkv"


class AttendingLayer(Protocol):
    layer_idx: int

    def attend(self, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, None]: ...


_pending = threading.local()


def mark_pending(layer: AttendingLayer) -> None:
    """Called by a layer's update(): the next attention call belongs to this layer."""
    _pending.layer = layer


def arkv_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """SDPA, or the pending cache layer's own attention when one is waiting."""
    layer = getattr(_pending, "layer", None)
    if layer is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    _pending.layer = None
    if layer.layer_idx != getattr(module, "layer_idx", layer.layer_idx):
        raise RuntimeError(f"attention of layer {module.layer_idx} received the cache of layer {layer.layer_idx}")
    return layer.attend(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(ATTN_NAME, arkv_attention)
AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)


def prepare_model(model: PreTrainedModel) -> PreTrainedModel:
    """Route the model's attention through the hook (idempotent). Needed by every method but `full`."""
    if model.config._attn_implementation != ATTN_NAME:
        model.set_attn_implementation(ATTN_NAME)
    return model


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[B, Hkv, N, D] -> [B, Hkv * groups, N, D], each KV head repeated for its query heads."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def attention_probs(query: torch.Tensor, key: torch.Tensor, allowed: torch.Tensor, scaling: float) -> torch.Tensor:
    """Softmax attention weights in float32, [B, Hq, q, N].

    `allowed` is a bool mask [B, Hkv or 1, q, N]; fully masked rows (padding queries) give zeros.
    The query heads of a KV group are multiplied against their shared keys directly, so the
    keys are never repeated per query head.
    """
    b, hq, q, d = query.shape
    hkv, n = key.shape[1], key.shape[2]
    grouped = query.reshape(b, hkv, (hq // hkv) * q, d).float()
    logits = torch.matmul(grouped, key.float().transpose(-1, -2)).view(b, hkv, hq // hkv, q, n).mul_(scaling)
    logits.masked_fill_(~allowed.unsqueeze(2), float("-inf"))
    return torch.softmax(logits, dim=-1).nan_to_num_(0.0).view(b, hq, q, n)


def lower_right_ready(x: torch.Tensor) -> bool:
    """Whether `causal_attention` runs on a fused kernel for activations like `x` (CUDA, half precision):
    elsewhere it would fall back to a materialised mask, so the model's own mask is used instead."""
    return x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)


def causal_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float) -> torch.Tensor:
    """Attention of the last q of n dense tokens, causal (aligned to the lower right): [B, q, Hq, D].

    No mask tensor and no keys repeated per query head, where a model's chunked prefill would build a
    [B, 1, q, n] mask and copy the keys and values for every query head of a group."""
    mask = causal_lower_right(query.shape[2], key.shape[2])
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling,
                                                           enable_gqa=True)
    return out.transpose(1, 2).contiguous()
