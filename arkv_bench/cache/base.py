"""What every arkv-bench cache shares: token positions, budgets, masks and accounting.

A `TokenLayer` holds one layer's tokens at full precision:

    keys, values  [B, H, n, D]  model dtype
    pos           [B, H, n]     int32, each slot's true sequence index; -1 marks an empty slot

Slots stay sorted by position, so attention sees the kept tokens in their original order.
Positions are the tokens' true ones: `get_seq_length()` is the number of tokens SEEN, not
held, so the model gives the next token its true RoPE position after eviction.

Left padding: the first real token of each row is `start[b]` (read from the model's mask
at prefill). Slots with `pos < start` (padding or empty) are never attended to.

Flow of one forward: `update()` appends the new tokens and marks the layer pending;
the attention hook calls `attend()`, which runs SDPA and then `after_attention()`, where a
method scores tokens and drops or quantizes what is over budget.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from arkv_bench.cache.attention import attention_probs, causal_attention, lower_right_ready, mark_pending

NOT_PREPARED = (
    "the model's attention does not call the arkv hook, so this cache cannot compress: "
    "call arkv_bench.cache.prepare_model(model) (or load it with attn_implementation='arkv') first"
)


SCORE_ELEMENTS = 1 << 26  # float32 attention weights scored at once at the end of prefill (256 MiB)


def tensor_bytes(*tensors: torch.Tensor | None) -> int:
    """Bytes of the given tensors' elements (None counts 0)."""
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def sorted_selection(keep: torch.Tensor, pos: torch.Tensor, capacity: int | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the kept slots of each (row, head), in position order.

    Heads may keep different numbers of slots; all are padded to `capacity` (by default the
    largest count, which costs a device sync) and `valid` says which indices are real. A
    capacity known in advance keeps decoding free of syncs.
    """
    big = torch.iinfo(torch.int64).max
    sort_key = torch.where(keep, pos.long(), torch.full_like(pos, big, dtype=torch.long))
    if capacity is None:
        capacity = int(keep.sum(dim=-1).max().item()) if keep.numel() else 0
    sorted_key, idx = sort_key.topk(min(capacity, keep.shape[-1]), dim=-1, largest=False, sorted=True)
    return idx, sorted_key != big


def gather_slots(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x [B, H, n, ...] at slot indices idx [B, H, m] -> [B, H, m, ...]."""
    index = idx.view(*idx.shape, *([1] * (x.dim() - 3))).expand(*idx.shape, *x.shape[3:])
    if x.element_size() == 1 and x.is_floating_point():  # FP8: gather the raw bytes (no FP8 gather on CPU)
        return x.view(torch.uint8).gather(2, index).view(x.dtype)
    return x.gather(2, index)


def first_real_index(mask: torch.Tensor | None, batch: int, device: torch.device) -> torch.Tensor:
    """Index of each row's first non-padding key, from the model's prefill mask."""
    if mask is None:
        return torch.zeros(batch, dtype=torch.int32, device=device)
    last_query = mask[:, 0, -1, :]
    visible = last_query if last_query.dtype == torch.bool else last_query == 0
    return visible.int().argmax(dim=-1).to(torch.int32)


class TokenLayer(CacheLayerMixin):
    """One layer's tokens at full precision, with positions, under a budget of `cache_size` slots."""

    is_sliding = False
    is_compileable = False

    def __init__(self, layer_idx: int, cache_size: int | None = None, window_size: int = 32, slack: int = 0,
                 **_: Any):
        super().__init__()
        self.layer_idx = layer_idx
        self.cache_size = cache_size
        self.window_size = window_size
        self.slack = slack  # extra slots freed per eviction, so that evictions happen every slack + 1 steps
        self.seen = 0
        self.start: torch.Tensor | None = None
        self.pos: torch.Tensor | None = None
        self.dense = True  # holds exactly tokens 0..seen-1, in order: the model's own mask is valid
        self.triggered = False
        self._awaiting_attention = False
        self._allowed: torch.Tensor | None = None  # this forward's attention mask, while attention runs
        self.padded = False  # some row of the batch is left-padded

    # --- transformers' layer interface -------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.take_device(key_states.dtype, key_states.device)
        self.keys = key_states[:, :, :0]
        self.values = value_states[:, :, :0]
        self.pos = torch.empty(*key_states.shape[:2], 0, dtype=torch.int32, device=self.device)
        self.is_initialized = True

    def take_device(self, dtype: torch.dtype, device: torch.device) -> None:
        """The layer's dtype and device; the rows' starts (read from the prompt's mask, on the first
        device) move to it: under --device-map the layers live on several devices."""
        self.dtype, self.device = dtype, device
        if self.start is not None:
            self.start = self.start.to(device)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
               ) -> tuple[torch.Tensor, torch.Tensor]:
        self.begin_update(key_states, value_states)
        self.append(key_states, value_states)
        return self.view()

    def begin_update(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Start of update(): allocate on first use, and mark the layer as waiting for its attention call."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self._awaiting_attention:
            raise RuntimeError(NOT_PREPARED)
        self._awaiting_attention = True
        mark_pending(self)

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        held = self.held_slots()
        return held + query_length, self.seen - held

    def get_max_length(self) -> int:
        return -1

    # --- storage -------------------------------------------------------------------------
    def append(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Add new tokens at full precision (the Original state)."""
        b, h, q, _ = key_states.shape
        new_pos = torch.arange(self.seen, self.seen + q, dtype=torch.int32, device=self.device).expand(b, h, q)
        self.keys = torch.cat([self.keys, key_states], dim=2)
        self.values = torch.cat([self.values, value_states], dim=2)
        self.pos = torch.cat([self.pos, new_pos], dim=2)
        self.seen += q

    def view(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values attention sees, in position order."""
        return self.keys, self.values

    def view_positions(self) -> torch.Tensor:
        """Positions aligned with `view()`."""
        return self.pos

    def held_slots(self) -> int:
        return 0 if self.pos is None else self.view_positions().shape[-1]

    def keep(self, keep: torch.Tensor, capacity: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Keep only the marked slots (in position order); everything else is evicted.

        Returns the (index, valid) selection so that subclasses can carry their own per-slot data.
        """
        idx, valid = sorted_selection(keep, self.pos, capacity)
        self.keys = gather_slots(self.keys, idx)
        self.values = gather_slots(self.values, idx)
        self.pos = torch.where(valid, self.pos.gather(2, idx), -1)
        self.dense = False
        self.triggered = True
        return idx, valid

    def nbytes(self) -> int:
        """Bytes of every tensor this layer holds."""
        return tensor_bytes(self.keys, self.values, self.pos, self.start)

    # --- attention -----------------------------------------------------------------------
    def live(self, pos: torch.Tensor) -> torch.Tensor:
        """Slots that hold a real (non-padding, non-empty) token."""
        return pos >= self.start.view(-1, 1, 1)

    def allowed(self, pos: torch.Tensor, n_queries: int, first: int = 0, last: int | None = None) -> torch.Tensor:
        """Bool mask [B, H, q, N] for queries first..last of the last `n_queries` tokens: live keys, causal by true position."""
        last = n_queries if last is None else last
        q_pos = torch.arange(self.seen - n_queries + first, self.seen - n_queries + last, device=pos.device, dtype=pos.dtype)
        causal = pos.unsqueeze(-2) <= q_pos.view(1, 1, -1, 1)
        return causal & self.live(pos).unsqueeze(-2)

    def probs(self, query: torch.Tensor, key: torch.Tensor, scaling: float, first: int = 0, last: int | None = None,
              rows: slice = slice(None)) -> torch.Tensor:
        """Attention weights [b, Hq, q, N] of queries first..last of this forward over the held keys
        (or the first N of them, when `key` is a prefix of the held keys), for the batch `rows`."""
        n_queries = query.shape[2]
        last = n_queries if last is None else last
        if self._allowed is not None:
            allowed = self._allowed[:, :, first:last]
        else:
            allowed = self.allowed(self.view_positions(), n_queries, first, last)
        return attention_probs(query[rows, :, first:last], key[rows], allowed[rows, ..., :key.shape[2]], scaling)

    def row_blocks(self, query: torch.Tensor, key: torch.Tensor, first: int) -> list[slice]:
        """Batch rows to score at once at the end of prefill: at most SCORE_ELEMENTS attention weights
        (and their temporaries) per block, so a large batch's scoring does not set the peak memory."""
        per_row = query.shape[1] * (query.shape[2] - first) * key.shape[2]
        step = max(1, SCORE_ELEMENTS // max(per_row, 1))
        return [slice(r, r + step) for r in range(0, query.shape[0], step)]

    def attend(self, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, None]:
        """SDPA over the held tokens, then let the method compress."""
        self._awaiting_attention = False
        if self.start is None:
            self.start = first_real_index(attention_mask, query.shape[0], query.device)
            self.padded = bool((self.start > 0).any())  # one sync per layer, at prefill
        q, n = query.shape[2], key.shape[2]
        scaling = kwargs.get("scaling") or query.shape[-1] ** -0.5
        sliding = kwargs.get("sliding_window") or getattr(module, "sliding_window", None)
        if self.dense and not self.padded and not sliding and lower_right_ready(query):
            out = causal_attention(query, key, value, scaling)  # the model's mask is plain causal: not needed
        else:
            if q == 1 and not self.may_hold_empty():
                attention_mask = None  # one query, and every held slot is a real past token: nothing to mask
            elif not (self.dense and (attention_mask.shape[-1] == n if attention_mask is not None else q in (1, n))):
                self._allowed = self.allowed(self.view_positions(), q)
                attention_mask = self._allowed.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
            out, _ = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
        self.after_attention(query, key, scaling)
        self._allowed = None
        return out, None

    def may_hold_empty(self) -> bool:
        """Whether some held slot may be padding or empty (then attention needs a mask). Methods
        that know better (every slot real unless the batch is padded) override this."""
        return True

    def after_attention(self, query: torch.Tensor, key: torch.Tensor, scaling: float) -> None:
        """Method hook: score and compress. The base class keeps everything."""

    def protected(self, pos: torch.Tensor) -> torch.Tensor:
        """The recent window: the last `window_size` positions are never evicted nor quantized."""
        return pos >= self.seen - self.window_size

    def keep_best(self, score: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Mark the `cache_size - slack` best slots: protected ones always, dead ones never."""
        score = score.masked_fill(self.protected(pos), float("inf")).masked_fill(~self.live(pos), float("-inf"))
        k = self.budget_capacity(score.shape[-1])
        top = score.topk(k, dim=-1).indices
        keep = torch.zeros_like(score, dtype=torch.bool).scatter_(-1, top, True)
        return keep & (score > float("-inf"))

    def budget_capacity(self, n: int) -> int:
        """Slots a budgeted layer keeps out of n (known without looking at the data)."""
        return min(self.cache_size - self.slack, n)

    def over_budget(self) -> bool:
        return self.cache_size is not None and self.held_slots() > self.cache_size

    # --- accounting ----------------------------------------------------------------------
    def counts(self) -> dict[str, float]:
        """Tokens seen, held Original / Quantized, and evicted, averaged over rows and heads."""
        if self.pos is None or self.start is None:
            return {"seen": float(self.seen), "original": float(self.seen), "quantized": 0.0, "evicted": 0.0}
        real_seen = float(self.seen - self.start.float().mean().item())
        original = self.live(self.pos).float().sum(-1).mean().item()
        quantized = self.quantized_count()
        return {"seen": real_seen, "original": original, "quantized": quantized,
                "evicted": max(real_seen - original - quantized, 0.0)}

    def quantized_count(self) -> float:
        return 0.0


class FullLayer(DynamicLayer):
    """The model's own dynamic layer (everything at full precision), with accounting."""

    def __init__(self, layer_idx: int, **_: Any):
        super().__init__()
        self.layer_idx = layer_idx
        self.triggered = False

    def nbytes(self) -> int:
        return tensor_bytes(self.keys, self.values) if self.is_initialized else 0

    def counts(self) -> dict[str, float]:
        seen = float(self.get_seq_length())
        return {"seen": seen, "original": seen, "quantized": 0.0, "evicted": 0.0}


class BenchCache(Cache):
    """A transformers `Cache` of arkv-bench layers that can say what it holds."""

    method = "base"
    layer_class: type[CacheLayerMixin] = TokenLayer
    budgeted = True  # has a hard per-layer token budget (cache_size)
    defaults: dict[str, Any] = {"cache_size": None, "window_size": 32}
    choices: dict[str, tuple] = {}

    def __init__(self, num_layers: int, attention_kernel: str = "auto", **options: Any):
        self.num_layers, self.options = num_layers, {**self.defaults, **options}
        self.attention_kernel = attention_kernel  # the slot stores' decode attention: auto, triton or torch
        super().__init__(layers=self._new_layers())

    def _new_layers(self) -> list[CacheLayerMixin]:
        layers = [self.layer_class(layer_idx=i, **self.options) for i in range(self.num_layers)]
        for layer in layers:
            if hasattr(layer, "attention_kernel"):
                layer.attention_kernel = self.attention_kernel
        return layers

    def reset(self) -> None:
        """Forget every token (a fresh cache with the same options)."""
        self.layers = self._new_layers()

    # --- what the generation loop tells the cache, and asks it ----------------------------------
    def reserve(self, prompt: int, new_tokens: int) -> None:
        """The prompt's (padded) width and the tokens to generate after it: stores are sized once."""
        for layer in self.layers:
            if hasattr(layer, "reserve"):
                layer.reserve = new_tokens

    def set_prompt_mask(self, attention_mask: torch.Tensor) -> None:
        """Each row's first real token, from the prompt's 2D mask (a chunk's own mask may not show it)."""
        start = attention_mask.int().argmax(dim=-1).to(torch.int32)
        padded = bool((start > 0).any())  # one sync, before the prompt
        for layer in self.layers:
            if isinstance(layer, TokenLayer):
                layer.start, layer.padded = start, padded

    def step_mask(self, attention_mask: torch.Tensor, new_tokens: int) -> torch.Tensor | None:
        """The fixed mask every decode step can use (so steps can be replayed), or None when the model
        needs the growing 2D mask. Slot stores mask by position themselves: a placeholder 4D mask
        tells transformers not to build one."""
        if all(getattr(layer, "stored", False) for layer in self.layers):
            return torch.ones(attention_mask.shape[0], 1, 1, 1, dtype=torch.bool, device=attention_mask.device)
        return None

    def set_prefill_open(self, more: bool) -> None:
        """Whether more prefill chunks follow the next forward (the methods select after the last one)."""
        for layer in self.layers:
            layer.prefill_open = more

    def plan(self, q: int) -> tuple | None:
        """A key for the next decode forward of q tokens (same key: same shapes and work, so one captured
        CUDA graph serves it), or None when it must run eagerly. Known on the host, without a sync."""
        self.settle()
        keys = [layer.plan(q) if hasattr(layer, "plan") else None for layer in self.layers]
        if any(key is None for key in keys):
            return None
        return (sum(layer.epoch for layer in self.layers), *keys)

    def shapes(self) -> tuple:
        """The shapes of every layer's tensors: a captured step fits a cache of the same shapes."""
        return tuple(tuple((name, tuple(t.shape)) for name, t in sorted(vars(layer).items())
                           if isinstance(t, torch.Tensor)) for layer in self.layers)

    def advance(self, q: int) -> None:
        """The host side of a decode forward that a replayed graph did on the device."""
        for layer in self.layers:
            layer.advance(q)

    def settle(self) -> None:
        """Host work the last forward left to its layers (a slot store's `settle`), done now."""
        for layer in self.layers:
            if hasattr(layer, "settle"):
                layer.settle()

    def kv_bytes(self) -> int:
        """Bytes of every tensor held: values, scales, zero points, positions."""
        self.settle()
        return sum(layer.nbytes() for layer in self.layers)

    def host_bytes(self) -> int:
        """Bytes a method keeps off the model's device (e.g. AKV's CPU tier): not part of kv_bytes()."""
        return 0

    def full_kv_bytes(self) -> int:
        """What the full (uncompressed) cache would hold for the same tokens."""
        total = 0
        for layer in self.layers:
            if layer.is_initialized:
                b, h, _, d = layer.keys.shape
                seen = layer.get_seq_length()
                total += 2 * b * h * seen * d * layer.keys.element_size()  # keys are in the model's dtype
        return total

    @property
    def compressed(self) -> bool:
        """Whether any layer ever dropped or quantized a token."""
        return any(layer.triggered for layer in self.layers)

    def layer_extra(self, layer_idx: int) -> dict[str, Any]:
        """Per-layer method statistics (e.g. ARKV's OQ score)."""
        return {}

    def stats(self) -> dict[str, Any]:
        self.settle()
        layers = [{"layer": i, **layer.counts(), **self.layer_extra(i)} for i, layer in enumerate(self.layers)]
        return {"method": self.method, "compressed": self.compressed, "kv_bytes": self.kv_bytes(),
                "kv_bytes_full": self.full_kv_bytes(), "layers": layers}
