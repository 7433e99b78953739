"""Layer-major prefill: every chunk of the prompt through layer l, then through layer l + 1.

A budgeted method keeps its layer dense through the whole prompt and selects at the end. Run
chunk by chunk through the whole model, that holds every layer's dense keys and values at once,
so the prompt alone sets the peak memory (about the full cache's). Layer l's work on chunk c
depends only on layer l's input for chunks 0..c and on its own cache, so the same work can run
layer by layer: all chunks through layer l (which then selects and frees its dense keys and
values), then layer l + 1. The peak becomes one layer's dense keys and values plus the prompt's
hidden states. Each chunk's mask, rotary embedding and attention are computed with the same
shapes and inputs as in the model's own forward, so the results are the same bit for bit (tested).
Where the hook attends causally without a mask (an unpadded batch in half precision on CUDA,
attention.causal_attention), no mask is built at all.

It applies to the decoder-only architectures whose forward is embed -> layers -> norm -> lm_head
with one full-attention mask (LLAMA_LIKE), on one device, for caches whose every layer is a slot
store (they stay dense during prefill and select after the last chunk).
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel
from transformers.masking_utils import create_causal_mask

from arkv_bench.cache import BenchCache
from arkv_bench.cache.attention import lower_right_ready
from arkv_bench.cache.store import SlotLayer

LLAMA_LIKE = ("llama", "qwen2", "qwen3")  # model types whose decoder forward this module replays


def applies(model: PreTrainedModel, cache: BenchCache) -> bool:
    """Whether `model` and `cache` can be prefilled layer by layer (see the module docstring)."""
    config = model.config
    inner = getattr(model, "model", None)
    one_device = len(set(getattr(model, "hf_device_map", {}).values())) <= 1
    full_attention = all(t == "full_attention" for t in getattr(config, "layer_types", None) or ())
    return (config.model_type in LLAMA_LIKE and inner is not None and hasattr(model, "lm_head") and one_device
            and full_attention and all(isinstance(layer, SlotLayer) for layer in cache.layers))


@torch.inference_mode()
def layer_major_prefill(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        positions: torch.Tensor, cache: BenchCache, bounds: list[tuple[int, int]]) -> torch.Tensor:
    """The prompt's chunks `bounds` through `cache`, layer by layer; the last position's logits [B, V]."""
    inner = model.model
    hidden = inner.embed_tokens(input_ids)  # [B, T, H], overwritten in place layer after layer
    rotary = [inner.rotary_emb(hidden[:, a:b], positions[:, a:b]) for a, b in bounds]
    plain = not cache.layers[0].padded and lower_right_ready(hidden)  # the hook attends causally without a mask
    for index, layer in enumerate(inner.layers[:model.config.num_hidden_layers]):
        for i, ((a, b), rope) in enumerate(zip(bounds, rotary)):
            cache.layers[index].prefill_open = i < len(bounds) - 1
            chunk = hidden[:, a:b]
            mask = None if plain else create_causal_mask(
                config=inner.config, inputs_embeds=chunk, attention_mask=attention_mask[:, :b], past_key_values=cache,
                position_ids=positions[:, a:b], layer_idx=index)
            out = layer(chunk, attention_mask=mask, position_embeddings=rope, position_ids=positions[:, a:b],
                        past_key_values=cache, use_cache=True)
            hidden[:, a:b] = out[0] if isinstance(out, tuple) else out
    a, b = bounds[-1]
    last = inner.norm(hidden[:, a:b])[:, -1:]  # normed as the model norms its last chunk
    return model.lm_head(last)[:, -1, :]
