"""The definition of decode attention over segments, in plain torch (the CPU path).

Every segment is dequantized to the model's dtype (what today's caches attend), the slots of
all segments are joined, and attention runs in float32 with one softmax over all of them.
A slot is attended by query t of row b iff `start[b] <= pos <= query_pos[b, t]`.
"""

from __future__ import annotations

import torch

from arkv_bench.cache.kernels.segments import Segment


def allowed_slots(pos: torch.Tensor, start: torch.Tensor, query_pos: torch.Tensor | None, n_queries: int
                  ) -> torch.Tensor:
    """Bool [B, Hkv, T, C]: live slots (pos >= start), causal by position when query_pos [B, T] is given."""
    live = (pos >= start.view(-1, 1, 1)).unsqueeze(2)
    if query_pos is None:
        return live.expand(-1, -1, n_queries, -1)
    return live & (pos.unsqueeze(2) <= query_pos.view(pos.shape[0], 1, n_queries, 1))


def reference_attention(query: torch.Tensor, segments: list[Segment], start: torch.Tensor, scaling: float,
                        query_pos: torch.Tensor | None = None, return_weights: bool = False, per_row: bool = False
                        ) -> tuple[torch.Tensor, list[torch.Tensor] | torch.Tensor | None]:
    """Output [B, Hq, T, D] in the query's dtype; with `return_weights`, each segment's attention
    weights [B, Hkv, C] averaged over the T queries and the query heads of each KV group, or with
    `per_row` every query's probabilities [B, Hq, T, N] over all segments' slots, in order."""
    b, hq, t, d = query.shape
    hkv = segments[0].pos.shape[1]
    keys = torch.cat([s.keys.dequantize(query.dtype) for s in segments], dim=2).float()
    values = torch.cat([s.values.dequantize(query.dtype) for s in segments], dim=2).float()
    pos = torch.cat([s.pos for s in segments], dim=2)
    values = values.masked_fill((pos < start.view(-1, 1, 1)).unsqueeze(-1), 0.0)  # empty slots may hold NaN
    grouped = query.float().reshape(b, hkv, hq // hkv * t, d)  # a KV head's query heads in a row
    logits = torch.matmul(grouped, keys.transpose(-1, -2)).view(b, hkv, hq // hkv, t, -1) * scaling
    allowed = allowed_slots(pos, start, query_pos, t).unsqueeze(2)
    probs = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1)
    probs = probs.masked_fill(~allowed.any(dim=-1, keepdim=True), 0.0)  # a query with no slot attends nothing
    out = torch.matmul(probs.view(b, hkv, hq // hkv * t, -1), values).view(b, hq, t, d).to(query.dtype)
    if not return_weights:
        return out, None
    if per_row:
        return out, probs.view(b, hq, t, -1)
    mean = probs.mean(dim=(2, 3))
    return out, list(mean.split([s.slots for s in segments], dim=-1))
