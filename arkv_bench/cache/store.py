"""The fixed-capacity slot store that every budgeted method (and `quant`) keeps its tokens in.

Prefill is dense: the prompt's keys and values are concatenated in order (chunk by chunk
when the prefill is chunked) and attention uses the model's mask. At the end of the last
prefill forward the method selects what it keeps and the layer moves it into preallocated
slots, once:

    keys, values      [B, Hkv, C_o, D]  model dtype     the Original slots
    pos               [B, Hkv, C_o]     int32           each slot's true position; -1 = empty
    kq, vq            [B, Hkv, C_q, D]  float8_e4m3fn   the Quantized slots (methods that quantize), kept
                                                        as their raw bytes (kq_bytes, vq_bytes: uint8)
    k_scale, v_scale  [B, Hkv, C_q, 1]  float32         one scale per token and head
    pos_q             [B, Hkv, C_q]     int32           -1 = empty

A slot is attended iff its position is >= `start[b]` (the row's first real token; left
padding and empty slots fail the test) and not after the query. Keys carry RoPE already,
so their order does not matter: a decode step writes the new token into an empty slot,
runs one q.K over all slots (its probabilities serve the attention output and the method's
score), and an eviction marks a slot empty. Pooling that needs position order sorts the
score vector, never the store. Everything a step changes is a device tensor (`seen_t`,
positions, scores), so the step has fixed shapes, no host sync and can be replayed from a
CUDA graph; the host only keeps counters that it can compute without looking at the data
(`seen`, `held` = an upper bound of the slots in use per row and head).

A method is a subclass that says what it keeps at the end of prefill (`end_prefill`) and
what it evicts while decoding (`decode_score`, or `after_decode` for more).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch

from arkv_bench.cache.base import TokenLayer, tensor_bytes
from arkv_bench.cache.kernels import decode_attention, fp8, original, resolve_backend
from arkv_bench.cache.quantize import FP8_DTYPE, fp8_quantize
from arkv_bench.cache.scoring import heavy_hitter_score

GROW = 64  # slots added at once when a store without a known reserve runs out (eager path only)


class Fusion:
    """While `on` (the generation loop sets it for the decode steps it replays from CUDA graphs), the
    store's decode-step methods run compiled by inductor: the dozens of small ops per layer become a
    few fused kernels. Off (CPU, eager steps, --no-compile), they run as written."""

    on = False
    compiled: dict[Callable, Callable] = {}
    broken: set[Callable] = set()


def fused(fn: Callable, layer: Any, *args: Any) -> Any:
    """fn(layer, *args), compiled while Fusion.on; a function that does not compile runs eagerly."""
    if not Fusion.on or fn in Fusion.broken:
        return fn(layer, *args)
    if fn not in Fusion.compiled:
        import torch._dynamo

        for name in ("recompile_limit", "cache_size_limit"):  # layers of different capacities recompile
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, 64)
        Fusion.compiled[fn] = torch.compile(fn, fullgraph=True)
    try:
        return Fusion.compiled[fn](layer, *args)
    except Exception as error:  # compile errors come before any work is done: run it eagerly from now on
        Fusion.broken.add(fn)
        warnings.warn(f"{fn.__qualname__} runs eagerly: it did not compile ({type(error).__name__}: {error})",
                      stacklevel=2)
        return fn(layer, *args)


def scatter_slots(store: torch.Tensor, slots: torch.Tensor, new: torch.Tensor) -> None:
    """store [B, H, C, ...] at slots [B, H, m] <- new [B, H, m, ...], in place (FP8 codes go into the
    store's raw bytes, `kq_bytes` / `vq_bytes`).

    An index_put_: compiled by inductor it writes only the m slots, where a scatter_ into a graph input
    copies the whole store twice (for a 32K-slot FP8 store at b8, 0.7 ms a layer and step)."""
    b, h, m = slots.shape
    rows = torch.arange(b, device=slots.device).view(b, 1, 1).expand(b, h, m)
    heads = torch.arange(h, device=slots.device).view(1, h, 1).expand(b, h, m)
    store.index_put_((rows, heads, slots), new.view(store.dtype) if new.dtype == FP8_DTYPE else new)


def take_slots(store: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """store [B, H, C, ...] at slots [B, H, m] -> [B, H, m, ...]."""
    index = slots.view(*slots.shape, *([1] * (store.dim() - 3))).expand(*slots.shape, *store.shape[3:])
    if store.dtype == FP8_DTYPE:
        return store.view(torch.uint8).gather(2, index).view(FP8_DTYPE)
    return store.gather(2, index)


def empty_like_slots(x: torch.Tensor, capacity: int, fill: float | int = 0) -> torch.Tensor:
    """A [B, H, capacity, ...] tensor like x, filled."""
    if x.dtype == FP8_DTYPE:
        return torch.zeros(*x.shape[:2], capacity, *x.shape[3:], dtype=torch.uint8, device=x.device).view(FP8_DTYPE)
    return torch.full((*x.shape[:2], capacity, *x.shape[3:]), fill, dtype=x.dtype, device=x.device)


def compact_index(keep: torch.Tensor, capacity: int) -> torch.Tensor:
    """Indices [B, H, capacity] of the kept slots (in slot order), then -1 for empty slots."""
    n = keep.shape[-1]
    ar = torch.arange(n, device=keep.device)
    idx = torch.where(keep, ar, n + ar).argsort(dim=-1)[..., :capacity]
    idx = torch.where(keep.gather(2, idx), idx, -1)
    if capacity > n:
        idx = torch.cat([idx, idx.new_full((*idx.shape[:2], capacity - n), -1)], dim=2)
    return idx


def take_or_empty(x: torch.Tensor, idx: torch.Tensor, fill: float | int = 0) -> torch.Tensor:
    """x [B, H, n, ...] at idx [B, H, m]; -1 gives an empty slot (`fill`; FP8 zeros)."""
    if x.shape[2] == 0:
        return empty_like_slots(x, idx.shape[-1], fill)
    taken = take_slots(x, idx.clamp_min(0))
    empty = (idx < 0).view(*idx.shape, *([1] * (x.dim() - 3)))
    if x.dtype == FP8_DTYPE:
        return taken.view(torch.uint8).masked_fill(empty, 0).view(FP8_DTYPE)
    return taken.masked_fill(empty, fill)


def codes_product(x: torch.Tensor, codes: torch.Tensor, fused: bool) -> torch.Tensor:
    """x [B, H, R, D] . FP8 codes [B, H, C, D]^T -> [B, H, R, C]. Compiled (`fused`), as a reduction that
    reads the codes once (no dequantized copy of the store); eager, a matmul on a converted copy."""
    if fused:
        return (x.float().unsqueeze(-2) * codes.float().unsqueeze(-3)).sum(dim=-1)
    return torch.matmul(x, codes.to(x.dtype).transpose(-1, -2))


def codes_weighted(weights: torch.Tensor, codes: torch.Tensor, fused: bool) -> torch.Tensor:
    """weights [B, H, R, C] (float32) @ FP8 codes [B, H, C, D] -> [B, H, R, D] float32, as codes_product."""
    if fused:
        return (weights.unsqueeze(-1) * codes.float().unsqueeze(-3)).sum(dim=-2)
    return torch.matmul(weights, codes.float())


def lowest(x: torch.Tensor, k: int) -> torch.Tensor:
    """Indices [..., k] of the k smallest values of the last dimension (k = 1: a fusable argmin)."""
    return x.argmin(dim=-1, keepdim=True) if k == 1 else x.topk(k, dim=-1, largest=False).indices


def position_order(pos: torch.Tensor) -> torch.Tensor:
    """Slot indices [B, H, N] in position order, empty slots last."""
    key = torch.where(pos >= 0, pos, torch.iinfo(pos.dtype).max)
    return key.argsort(dim=-1)  # live positions are distinct: only empty slots tie, and they score 0


def rank_by_position(score: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """A score [B, H, N] with exact ties broken by position (the earlier token ranks higher), so that
    the selection does not depend on which slot a token sits in: -rank, as float."""
    order = position_order(pos)
    by_position = score.gather(-1, order).argsort(dim=-1, descending=True, stable=True).argsort(dim=-1)
    return -torch.empty_like(by_position).scatter_(-1, order, by_position).float()


def pooled_score(a: torch.Tensor, pos: torch.Tensor, exclude: torch.Tensor, gamma: float, pooling: str,
                 kernel_size: int) -> torch.Tensor:
    """ARKV/SnapKV score [B, Hkv, N] of every slot from the attention `a` [B, Hq, q, N] over the slots.

    Pooling spreads a score to the neighbouring *positions*, so the scores are pooled in position
    order: `a` is sorted (not the store), the `exclude`d columns (the window) are zeroed, which equals
    cutting them off, and the result is put back in slot order."""
    b, hq, q, n = a.shape
    hkv = pos.shape[1]
    order = position_order(pos)
    a = a.masked_fill(exclude.repeat_interleave(hq // hkv, dim=1).unsqueeze(2), 0.0)
    sorted_a = a.gather(-1, order.repeat_interleave(hq // hkv, dim=1).unsqueeze(2).expand(b, hq, q, n))
    sorted_score = heavy_hitter_score(sorted_a, gamma, pooling, kernel_size, hkv)
    return torch.empty_like(sorted_score).scatter_(-1, order, sorted_score)


class SlotLayer(TokenLayer):
    """One layer's tokens: dense during prefill, then fixed Original (+ Quantized) slots."""

    is_compileable = True
    has_quantized = False  # the method keeps an FP8 Quantized store
    decode_evicts = True  # the method evicts while decoding when over `cache_size`
    attention_kernel = "auto"  # decode attention over the slots: auto, triton or torch (set by the cache)

    def __init__(self, layer_idx: int, cache_size: int | None = None, window_size: int = 32, slack: int = 0, **_: Any):
        super().__init__(layer_idx, cache_size, window_size, slack)
        self.stored = False  # dense until the end of prefill, then fixed slots
        self.prefill_open = False  # more prefill chunks follow this forward (set by the generation loop)
        self.reserve = 0  # tokens the caller will add after the prompt: sizes the stores so they never grow
        self.held = 0  # slots in use per (row, head), an upper bound known without looking at the data
        self.evicting = False  # this forward evicts (decided on the host, before the step)
        self.epoch = 0  # bumped whenever a store is reallocated: captured decode graphs are stale then
        self.seen_t: torch.Tensor | None = None  # `seen` on the device, for graph-replayed steps
        self.kq_bytes = self.vq_bytes = self.k_scale = self.v_scale = self.pos_q = None

    # The FP8 slots are held as raw bytes: a decode step writes into the uint8 tensor itself, since
    # inductor turns a write through a dtype view of a graph input into copies of the whole store (on
    # CUDA). Everything else reads and assigns them as FP8.
    @property
    def kq(self) -> torch.Tensor | None:
        return None if self.kq_bytes is None else self.kq_bytes.view(FP8_DTYPE)

    @kq.setter
    def kq(self, codes: torch.Tensor | None) -> None:
        self.kq_bytes = None if codes is None else codes.view(torch.uint8)

    @property
    def vq(self) -> torch.Tensor | None:
        return None if self.vq_bytes is None else self.vq_bytes.view(FP8_DTYPE)

    @vq.setter
    def vq(self, codes: torch.Tensor | None) -> None:
        self.vq_bytes = None if codes is None else codes.view(torch.uint8)

    # --- transformers' layer interface ------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
               ) -> tuple[torch.Tensor, torch.Tensor]:
        self.begin_update(key_states, value_states)
        if not self.stored:
            self.append(key_states, value_states)
            return self.keys, self.values
        self.settle()  # a forward without cache.plan before it (extend, lm-eval): the host work left is done here
        q = key_states.shape[2]
        if self.plan(q) is None:
            self.make_room(q)
        self.advance(q)
        fused(type(self).write, self, key_states, value_states)
        return key_states, value_states  # attention reads the slots itself (attend)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        if self.stored:  # the layer masks by position itself: the model's mask is not used
            return query_length, self.seen
        return super().get_mask_sizes(query_length)

    def settle(self) -> None:
        """Method hook: host work the last forward left for before anything reads the stores again (ARKV's
        first quantization event). The cache runs it before planning a step and before accounting."""

    # --- host-side plan of a decode forward -------------------------------------------------
    def original_room(self) -> int:
        """Empty Original slots guaranteed (a new token always goes to the Original store)."""
        return self.pos.shape[-1] - self.held_original()

    def held_original(self) -> int:
        return self.held

    def will_evict(self, q: int) -> bool:
        return self.decode_evicts and self.cache_size is not None and self.held + q > self.cache_size

    def plan(self, q: int) -> tuple | None:
        """What the next forward of q tokens does, known on the host: a key for its captured graph,
        or None when it must run eagerly (a store grows, or the method's data-dependent event)."""
        if not self.stored or self.original_room() < q:
            return None
        return (q, self.will_evict(q))

    def advance(self, q: int) -> None:
        """Host bookkeeping of a forward of q tokens (also run alone when a captured graph replays it)."""
        self.seen += q
        self.evicting = self.will_evict(q)
        self.held = self.cache_size - self.slack if self.evicting else self.held + q

    def make_room(self, q: int) -> None:
        """Eager path: grow the Original store so that q new tokens fit (a store that evicts back to its
        budget needs exactly that; one that keeps growing gets GROW slots more, when nothing is reserved)."""
        missing = q - self.original_room()
        if missing > 0:
            evicts = self.decode_evicts and self.cache_size is not None
            self.grow_original(missing + (0 if self.reserve or evicts else GROW))

    def grow_original(self, extra: int) -> None:
        self.keys = torch.cat([self.keys, empty_like_slots(self.keys, extra)], dim=2)
        self.values = torch.cat([self.values, empty_like_slots(self.values, extra)], dim=2)
        self.pos = torch.cat([self.pos, empty_like_slots(self.pos, extra, -1)], dim=2)
        self.grow_extras(extra)
        self.epoch += 1

    def grow_extras(self, extra: int) -> None:
        """Method hook: per-slot tensors of the Original store grow with it."""

    # --- storage ----------------------------------------------------------------------------
    def write(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Write q new tokens into empty Original slots (the q smallest positions: empty is -1)."""
        q = key_states.shape[2]
        self.seen_t.add_(q)
        slots = lowest(self.pos, q)
        new_pos = self.query_positions(q).expand_as(slots)
        scatter_slots(self.keys, slots, key_states)
        scatter_slots(self.values, slots, value_states)
        scatter_slots(self.pos, slots, new_pos)
        self.on_write(slots)

    def on_write(self, slots: torch.Tensor) -> None:
        """Method hook: reset per-slot data of the slots that just took new tokens."""

    def build_store(self, keep: torch.Tensor, capacity: int | None = None) -> torch.Tensor:
        """End of prefill: move the kept dense slots [B, H, n] (bool) into fixed Original slots (by default
        as many as `keep_capacity` says), in position order, the rest empty. Returns the dense index of
        each slot, -1 if empty (for the method's per-slot extras)."""
        live = self.live(self.pos)
        self.triggered = self.triggered or bool((live & ~keep).any())  # syncs, once, at the end of prefill
        keep = keep & live
        self.held = int(keep.sum(dim=-1).max())
        idx = compact_index(keep, self.keep_capacity(self.held) if capacity is None else capacity)
        self.keys, self.values = take_or_empty(self.keys, idx), take_or_empty(self.values, idx)
        self.pos = take_or_empty(self.pos, idx, -1)
        self.seen_t = torch.tensor(self.seen, dtype=torch.int32, device=self.pos.device)
        self.stored, self.dense = True, False
        self.epoch += 1
        return idx

    def keep_capacity(self, kept: int) -> int:
        """Original slots for `kept` tokens per head after prefill: room for what will still come."""
        if self.cache_size is not None and self.decode_evicts:
            return max(kept, min(self.cache_size, kept + self.reserve) if self.reserve else self.cache_size) + 1
        return kept + (self.reserve or GROW) + 1

    def evict(self, score: torch.Tensor, q: int) -> torch.Tensor:
        """After a forward of q tokens, keep the `cache_size - slack` best slots of [Original, Quantized]:
        the lowest-scored live, unprotected slots become empty. Returns the evicted mask [B, H, N].

        `score` [B, H, N] is per slot. Before the forward a row held at most `cache_size` tokens, so at
        most slack + q leave: the victims are the slack + q lowest (one argmin at slack 0), of which
        each row evicts as many as it holds over the budget (rows with fewer tokens evict none)."""
        pos_all = self.all_positions()
        live = self.live(pos_all)
        over = (live.sum(dim=-1, keepdim=True) - (self.cache_size - self.slack)).clamp_min(0)
        m = min(self.slack + q, pos_all.shape[-1])
        victims = lowest(score.masked_fill(self.protected_t(pos_all) | ~live, float("inf")), m)
        chosen = torch.arange(m, device=victims.device) < over
        return self.empty_slots(torch.zeros_like(live).scatter_(-1, victims, chosen))

    def empty_slots(self, evicted: torch.Tensor) -> torch.Tensor:
        """Mark the slots of [Original, Quantized] in `evicted` [B, H, N] empty; returns it."""
        n_o = self.pos.shape[-1]
        self.pos.masked_fill_(evicted[..., :n_o], -1)
        if self.pos_q is not None:
            self.pos_q.masked_fill_(evicted[..., n_o:], -1)
        self.triggered = True
        return evicted

    def all_positions(self) -> torch.Tensor:
        return self.pos if self.pos_q is None else torch.cat([self.pos, self.pos_q], dim=2)

    def query_positions(self, q: int) -> torch.Tensor:
        """[q] int32: the true positions of this forward's q tokens, from the device count (graph-safe)."""
        return self.seen_t - q + torch.arange(q, device=self.seen_t.device, dtype=torch.int32)

    def protected_t(self, pos: torch.Tensor) -> torch.Tensor:
        """The recent window, from the device's count of tokens seen (graph-safe)."""
        return pos >= self.seen_t - self.window_size

    # --- attention ----------------------------------------------------------------------------
    def attend(self, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, None]:
        if not self.stored:
            return super().attend(module, query, key, value, attention_mask, **kwargs)
        self._awaiting_attention = False
        scaling = kwargs.get("scaling") or query.shape[-1] ** -0.5
        if self.kernel_backend(query) == "triton":
            out, probs = self.kernel_attention(query, scaling)
        else:
            out, probs = fused(type(self).slot_attention, self, query, scaling)
        fused(type(self).after_decode, self, query, probs)
        return out, None

    def kernel_backend(self, query: torch.Tensor) -> str:
        """"triton" or "torch": what `attention_kernel` resolves to for this query over these slots."""
        b, hq, q, d = query.shape
        return resolve_backend(self.attention_kernel, query.device, query.dtype, hq // self.keys.shape[1] * q, d,
                               16 if self.pos_q is None else 8)

    def kernel_attention(self, query: torch.Tensor, scaling: float) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`slot_attention` through the Triton kernel, which reads the Quantized slots as FP8 codes (no
        dequantized copy): the output [B, q, Hq, D] and, when the method reads them this forward
        (`needs_probs`), the probabilities [B, Hq, q, N], Original slots then Quantized (else None)."""
        segments = [original(self.keys, self.values, self.pos)]
        if self.pos_q is not None:
            segments.append(fp8(self.kq, self.k_scale, self.vq, self.v_scale, self.pos_q))
        q = query.shape[2]
        q_pos = None if q == 1 else self.query_positions(q)
        out, probs = decode_attention(query, segments, self.start, scaling, q_pos, return_weights=self.needs_probs(),
                                      backend="triton", per_row=True)
        return out.transpose(1, 2), probs

    def needs_probs(self) -> bool:
        """Method hook: whether `after_decode` reads this decode forward's probabilities (known on the host)."""
        return True

    def after_attention(self, query: torch.Tensor, key: torch.Tensor, scaling: float) -> None:
        """Dense phase: accumulate what the method needs from this chunk; after the last one, select."""
        self.accumulate(query, key, scaling)
        if not self.prefill_open:
            self.end_prefill(query, key, scaling)

    def accumulate(self, query: torch.Tensor, key: torch.Tensor, scaling: float) -> None:
        """Method hook, every prefill forward (H2O sums the attention here)."""

    def end_prefill(self, query: torch.Tensor, key: torch.Tensor, scaling: float) -> None:
        """Method hook: select what stays and build the store. The base keeps every live token."""
        self.build_store(self.live(self.pos))

    def slot_attention(self, query: torch.Tensor, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
        """One q.K over every slot: the output [B, q, Hq, D] and the probabilities [B, Hq, q, N] (float32)."""
        b, hq, q, d = query.shape
        hkv = self.keys.shape[1]
        grouped = query.reshape(b, hkv, (hq // hkv) * q, d)
        logits = torch.matmul(grouped, self.keys.transpose(-1, -2))
        if self.pos_q is not None:
            logits_q = codes_product(grouped, self.kq, Fusion.on) * self.k_scale.view(b, hkv, 1, -1)
            logits = torch.cat([logits.float(), logits_q.float()], dim=-1)
        logits = logits.float().view(b, hkv, hq // hkv, q, -1) * scaling
        allowed = self.slot_allowed(q)
        probs = torch.softmax(logits.masked_fill(~allowed.unsqueeze(2), float("-inf")), dim=-1)
        probs = probs.view(b, hkv, (hq // hkv) * q, -1)
        n_o = self.keys.shape[2]
        out = torch.matmul(probs[..., :n_o].to(query.dtype), self.values)
        if self.pos_q is not None:
            weights = probs[..., n_o:] * self.v_scale.view(b, hkv, 1, -1)
            out = out + codes_weighted(weights, self.vq, Fusion.on).to(query.dtype)
        out = out.reshape(b, hq, q, d).transpose(1, 2)
        return out, probs.view(b, hq, q, -1)

    def slot_allowed(self, q: int) -> torch.Tensor:
        """[B, H, q, N]: live slots, causal by true position among the q new tokens."""
        pos = self.all_positions()
        live = self.live(pos).unsqueeze(-2)
        if q == 1:
            return live
        q_pos = self.query_positions(q)
        return live & (pos.unsqueeze(-2) <= q_pos.view(1, 1, -1, 1))

    def after_decode(self, query: torch.Tensor, probs: torch.Tensor) -> None:
        """Method hook after a decode forward's attention: evict by `decode_score` when over budget."""
        if self.evicting:
            self.evict(self.decode_score(probs), query.shape[2])

    def decode_score(self, probs: torch.Tensor) -> torch.Tensor:
        """Method hook: the score [B, Hkv, N] of every slot (higher = keep)."""
        raise NotImplementedError

    # --- what the layer holds -------------------------------------------------------------------
    def view_positions(self) -> torch.Tensor:
        return self.pos

    def held_slots(self) -> int:
        return 0 if self.pos is None else self.held if self.stored else self.pos.shape[-1]

    def quantized_count(self) -> float:
        if self.pos_q is None or self.start is None:
            return 0.0
        return self.live(self.pos_q).float().sum(-1).mean().item()

    def nbytes(self) -> int:
        """Bytes of every tensor the layer holds: slots, codes, scales, positions and the method's own."""
        return sum(tensor_bytes(v) for v in vars(self).values() if isinstance(v, torch.Tensor))


def quantize_into(layer: SlotLayer, src: torch.Tensor, move: torch.Tensor) -> None:
    """Move Original slots `src` [B, H, m] to empty Quantized slots where `move` [B, H, m] (bool):
    only these tokens are quantized; the source slots become empty."""
    m = src.shape[-1]
    dst = lowest(layer.pos_q, m)  # empty Quantized slots (-1) come first
    kq, ks = fp8_quantize(take_slots(layer.keys, src))
    vq, vs = fp8_quantize(take_slots(layer.values, src))
    scatter_slots(layer.kq_bytes, dst, kq)
    scatter_slots(layer.vq_bytes, dst, vq)
    scatter_slots(layer.k_scale, dst, ks)
    scatter_slots(layer.v_scale, dst, vs)
    moved_pos = layer.pos.gather(2, src)
    scatter_slots(layer.pos_q, dst, torch.where(move, moved_pos, -1))
    scatter_slots(layer.pos, src, torch.where(move, -1, moved_pos))
