"""transformers backend: the model reads and writes K/V through the shared slot pool.

The one adapter that touches transformers internals is ``PoolKV``: a duck-typed cache whose
per-layer ``update()`` writes this step's keys/values into the pool and returns, for each row,
the keys/values gathered along that row's slot list. The forward call gets explicit
``position_ids`` and a 4D attention mask per attention type (causal, plus sliding windows).
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from decodekit.backends.base import Backend, ForwardRow
from decodekit.backends.cpu_linear import pack_linears, repack_linears
from decodekit.cache import CacheManager


class PoolKV:
    """K/V storage of one namespace: per layer a (capacity + 1, kv_heads, head_dim) tensor per K and V."""

    def __init__(self, capacity: int, num_layers: int, dtype: torch.dtype, device: torch.device):
        self.capacity, self.dtype, self.device = capacity, dtype, device
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers

    def _storage(self, layer: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.keys[layer] is None:
            _, heads, _, dim = like.shape
            shape = (self.capacity + 1, heads, dim)
            # torch.empty leaves pages uncommitted until written; slot 0 (scratch) must be finite.
            self.keys[layer] = torch.empty(shape, dtype=self.dtype, device=self.device)
            self.values[layer] = torch.empty(shape, dtype=self.dtype, device=self.device)
            self.keys[layer][0].zero_()
            self.values[layer][0].zero_()
        return self.keys[layer], self.values[layer]


class StepCache:
    """What the model sees as ``past_key_values`` during one forward call."""

    is_compileable = False

    def __init__(self, store: PoolKV, write_idx: torch.Tensor, gather_idx: torch.Tensor, span):
        self.store = store
        self.write_idx = write_idx  # (B*T,) slot per input position; pads write scratch slot 0
        self.gather_idx = gather_idx  # (B, L) slots to read per row, padded with 0
        self.span = span  # (start, stop) when one row reads a contiguous slot range: a view, no copy

    def update(self, key_states, value_states, layer_idx, cache_kwargs=None):
        keys, values = self.store._storage(layer_idx, key_states)
        b, h, t, d = key_states.shape  # (B, H, T, D)
        flat_k = key_states.transpose(1, 2).reshape(b * t, h, d).to(keys.dtype)
        flat_v = value_states.transpose(1, 2).reshape(b * t, h, d).to(values.dtype)
        if self.span is not None:
            start, stop = self.span
            keys[stop - t : stop] = flat_k
            values[stop - t : stop] = flat_v
            return keys[start:stop].unsqueeze(0).transpose(1, 2), values[start:stop].unsqueeze(0).transpose(1, 2)
        keys.index_copy_(0, self.write_idx, flat_k)
        values.index_copy_(0, self.write_idx, flat_v)
        return self._gather(keys), self._gather(values)

    def _gather(self, store: torch.Tensor) -> torch.Tensor:
        """(B, H, L, D) K or V along each row's slot list; index_select is ~4x faster than fancy indexing."""
        b, length = self.gather_idx.shape
        rows = store.index_select(0, self.gather_idx.view(-1))
        return rows.view(b, length, *store.shape[1:]).transpose(1, 2)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0

    # With one row there is no padding: transformers builds the causal (and sliding-window) mask
    # itself from these sizes, and skips it entirely for a plain decode step, which lets sdpa run
    # grouped-query attention without repeating K/V heads.
    def get_query_offset(self, layer_idx: int = 0) -> int:
        return self.gather_idx.shape[1] - self.write_idx.shape[0]

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.gather_idx.shape[1], 0


GQA_SDPA = "decodekit_sdpa"
# Gathering one key's K and V for every layer into a batch row costs about this much of a token's
# linear-layer work on CPU (SmolLM2-135M: ~15% of a balanced batch-16 decode step at 300-token contexts).
GATHER_COST = 1e-3


def gqa_sdpa_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                       **kwargs):
    """transformers' sdpa attention, but grouped-query heads go to sdpa as they are even with a mask.

    transformers repeats K/V heads whenever a mask is given (some CUDA kernels need that); on CPU,
    sdpa's ``enable_gqa`` with a mask is exact and ~4x faster for a padded decode batch.
    """
    q_len, kv_len = query.shape[2], key.shape[2]
    causal = attention_mask is None and q_len > 1
    if causal and kv_len != q_len:  # masking_utils only skips the mask when queries and keys align
        raise RuntimeError("causal attention without a mask needs as many keys as queries")
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout,
                                         scale=scaling, is_causal=causal, enable_gqa=key.shape[1] != query.shape[1])
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(GQA_SDPA, gqa_sdpa_attention)
AttentionMaskInterface.register(GQA_SDPA, sdpa_mask)


class HFBackend(Backend):
    """A transformers model on decodekit's slot pool.

    ``wrapped=True``: ``model`` is someone else's module (a trainer's policy): it is used as it is, no
    ``eval()`` left behind (each forward runs in eval mode and restores every submodule's mode after) and
    no packed weight copies. ``sync_weights()`` drops the prefix cache after the weights changed (the
    parameters' version counters or a sample of their values moved, or ``force``), and a forward whose
    version counters moved since the last sync raises instead of mixing K/V of old and new weights.
    """

    def __init__(self, model, tokenizer, *, name: str, cache_tokens: int = 16384, prefix_cache: bool = True,
                 packed_linears: bool = False, wrapped: bool = False):
        super().__init__()
        if wrapped and packed_linears:
            raise ValueError("packed_linears copies the weights (stale after an optimizer step): "
                             "not for a wrapped module")
        self.wrapped = wrapped
        self.model = model if wrapped else model.eval()
        self.packed_linears = pack_linears(model) if packed_linears else 0  # CPU float32 only
        self._params = list(model.parameters())
        self._weights_seen, self._seen_values = self.weights_version(), self._fingerprint()
        self.tokenizer = tokenizer
        self.name = name
        config = model.config
        self.config = config
        self.vocab_size = config.vocab_size
        self.max_context = int(getattr(config, "max_position_embeddings", 2048))
        self.num_params = sum(p.numel() for p in model.parameters())
        self.device = next(model.parameters()).device
        self.cache = CacheManager(cache_tokens, prefix_cache=prefix_cache)
        self.kv = PoolKV(cache_tokens, config.num_hidden_layers, model.dtype, self.device)
        layer_types = getattr(config, "layer_types", None) or []
        self.sliding_window = getattr(config, "sliding_window", None) if "sliding_attention" in layer_types else None
        self.mask_by_type = _accepts_mask_mapping(model)
        self.eager = config._attn_implementation == "eager"
        configs = {id(c): c for m in model.modules() if (c := getattr(m, "config", None)) is not None}
        self._sdpa_configs = [c for c in configs.values() if getattr(c, "_attn_implementation", None) == "sdpa"]
        self._hidden: torch.Tensor | None = None
        self.key_cost = _key_cost(config, self.num_params)

    def capture_features(self) -> None:
        """Keep the final-norm hidden states (what the LM head reads) of every forward."""
        if not self.capturing:
            norm = getattr(getattr(self.model, "model", None), "norm", None)
            if norm is None:
                raise ValueError(f"model {self.name!r} has no final norm (model.model.norm) to read features from")
            norm.register_forward_hook(self._store_hidden)
        super().capture_features()

    def _store_hidden(self, module, args, output) -> None:
        self._hidden = output

    @torch.inference_mode()
    def forward_rows(self, rows: list[ForwardRow]) -> list[torch.Tensor]:
        if self._pack_pays(rows):
            return self._forward_packed(rows, self._packing(rows)[0])
        inputs = _assemble(rows, self.device)
        masks = self._masks(inputs) if len(rows) > 1 else None
        keep = max(r.num_logits for r in rows)
        out = self._run(inputs, masks, keep)
        logits = out.logits.float()  # (B, keep, V)
        if self._hidden is not None:
            t = self._hidden.shape[1]  # rows are left-padded: each row's new tokens are its last positions
            self.last_hidden = [self._hidden[b, t - len(r.new_ids):] for b, r in enumerate(rows)]
            self._hidden = None
        return [logits[b, keep - r.num_logits :] for b, r in enumerate(rows)]

    def _forward_packed(self, rows: list[ForwardRow], bins: list[list[int]]) -> list[torch.Tensor]:
        """Ragged rows packed into bins as long as the longest row: each bin row holds the new tokens
        of several sequences, each attending only to its own keys (block-causal mask over the members'
        concatenated slot lists). A verify row of k + 1 tokens beside one-token decode rows then costs
        about k extra tokens, not k per row, and each query sees only its bin's keys. One bin of every
        row serves one-token rows of very different context lengths: padding would gather every row's
        keys up to the longest context."""
        inputs = _assemble_bins(rows, bins, self.device)
        # the LM head runs only at positions some member needs logits for (a prefill chunk needs one)
        needed = sorted({p for members, ends in zip(bins, inputs["ends"]) for i, end in zip(members, ends)
                         for p in range(end - rows[i].num_logits, end)})
        column = {p: j for j, p in enumerate(needed)}
        keep = torch.tensor(needed, device=self.device)
        logits = self._run(inputs, self._masks(inputs), keep).logits.float()  # (B', len(needed), V)
        out: list[torch.Tensor | None] = [None] * len(rows)
        hidden: list[torch.Tensor | None] = [None] * len(rows)
        for b, (members, ends) in enumerate(zip(bins, inputs["ends"])):
            for i, end in zip(members, ends):
                first = column[end - rows[i].num_logits]  # a member's positions are consecutive in ``needed``
                out[i] = logits[b, first : first + rows[i].num_logits]
                if self._hidden is not None:
                    hidden[i] = self._hidden[b, end - len(rows[i].new_ids) : end]
        if self._hidden is not None:
            self.last_hidden, self._hidden = hidden, None
        return out

    def _pack_pays(self, rows: list[ForwardRow]) -> bool:
        """Whether packed bins beat left-padding (``_packing``'s cost model)."""
        if len(rows) < 2:
            return False
        return self._packing(rows)[1] < self._layout_cost(rows, [[i] for i in range(len(rows))])

    def _packing(self, rows: list[ForwardRow]) -> tuple[list[list[int]], float]:
        """The cheaper packing: bins as wide as the longest row, or one bin of every row."""
        options = [_bins(rows), [list(range(len(rows)))]]
        costs = [self._layout_cost(rows, bins) for bins in options]
        best = min(range(len(options)), key=costs.__getitem__)
        return options[best], costs[best]

    def _layout_cost(self, rows: list[ForwardRow], bins: list[list[int]]) -> float:
        """Work of a (bins, width) layout in token units: linear layers per token slot, attention per
        query and key, and the gather of every bin row's keys (K and V of every layer)."""
        width = max(sum(len(rows[i].new_ids) for i in m) for m in bins)
        keys = max(sum(len(rows[i].slots) for i in m) for m in bins)
        return len(bins) * (width * (1 + self.key_cost * keys) + GATHER_COST * keys)

    # ---- weights that change under the backend (a trainer's module) --------------------------------
    def weights_version(self) -> tuple[int, ...]:
        """The parameters' in-place version counters: ``load_state_dict`` and foreach / for-loop optimizer
        steps bump them; fused optimizer kernels (``AdamW(fused=True)``, TRL's default) do not."""
        return tuple(p._version for p in self._params)

    def _fingerprint(self) -> torch.Tensor:
        """A strided sample (about 16 values) of every parameter: an optimizer step moves nearly all of them."""
        with torch.no_grad():
            return torch.cat([p.detach().reshape(-1)[:: max(1, p.numel() // 16)].float() for p in self._params])

    def sync_weights(self, force: bool = False) -> bool:
        """Drop the prefix cache if the weights changed since the last sync (version counters, then a
        sample of the values), or when ``force`` (the caller knows they changed); True when dropped. No
        request may hold K/V then (``CacheManager.drop_prefix_cache`` raises)."""
        same = self.weights_version() == self._weights_seen and torch.equal(self._fingerprint(), self._seen_values)
        if same and not force:
            return False
        self.cache.drop_prefix_cache()
        if self.packed_linears:
            repack_linears(self.model)
        self._weights_seen, self._seen_values = self.weights_version(), self._fingerprint()
        return True

    def update_weights(self, state_dict, strict: bool = True) -> None:
        """Load new weights (a separate inference copy of a trained policy) and drop the prefix cache."""
        with torch.no_grad():
            self.model.load_state_dict(state_dict, strict=strict)
        self.sync_weights(force=True)

    @contextmanager
    def _eval_mode(self):
        """A wrapped module runs in eval mode for this call and gets every submodule's own mode back."""
        if not self.wrapped:
            yield
            return
        if self.weights_version() != self._weights_seen:
            raise RuntimeError(f"the weights of {self.name!r} changed while requests hold K/V computed with the "
                               "old ones: call sync_weights() between weight updates and generation "
                               "(LLM does it before each call)")
        modes = [(m, m.training) for m in self.model.modules()]
        self.model.eval()
        try:
            yield
        finally:
            for module, training in modes:
                module.training = training

    def _run(self, inputs: dict, masks, keep):
        step = StepCache(self.kv, inputs["write_idx"], inputs["gather_idx"], inputs["span"])
        with self._gqa_attention(), self._eval_mode():
            return self.model(
                input_ids=inputs["input_ids"],
                position_ids=inputs["position_ids"],
                attention_mask=masks,
                past_key_values=step,
                use_cache=True,
                logits_to_keep=keep,
            )

    @contextmanager
    def _gqa_attention(self):
        """Run sdpa models with ``gqa_sdpa_attention`` for this call only: the model, which the
        caller may also use directly, keeps its own setting."""
        for c in self._sdpa_configs:
            c._attn_implementation = GQA_SDPA
        try:
            yield
        finally:
            for c in self._sdpa_configs:
                c._attn_implementation = "sdpa"

    def _masks(self, inputs):
        allowed = inputs["allowed"] if "allowed" in inputs else _allowed(inputs)  # (B, T, L) bool
        full = self._format_mask(allowed)
        if not self.mask_by_type:
            return full
        masks = {"full_attention": full}
        if self.sliding_window:
            qpos = inputs["position_ids"].unsqueeze(-1)
            kpos = inputs.get("key_pos", torch.arange(allowed.shape[-1], device=self.device))
            in_window = kpos > qpos - self.sliding_window
            masks["sliding_attention"] = self._format_mask(allowed & (in_window | inputs["pad_query"].unsqueeze(-1)))
        return masks

    def _format_mask(self, allowed: torch.Tensor) -> torch.Tensor:
        mask = allowed.unsqueeze(1)  # (B, 1, T, L)
        if self.eager:
            dtype = self.model.dtype
            return torch.zeros(mask.shape, dtype=dtype, device=self.device).masked_fill(~mask, torch.finfo(dtype).min)
        return mask


def _key_cost(config, num_params: int) -> float:
    """Attention work per key of one query token, against that token's linear-layer work (about
    2 flops per parameter): 4 flops per head dimension per layer (scores and values)."""
    layers = int(getattr(config, "num_hidden_layers", 1))
    heads = int(getattr(config, "num_attention_heads", 1))
    head_dim = int(getattr(config, "head_dim", None) or getattr(config, "hidden_size", 64) // heads)
    return 4 * layers * heads * head_dim / max(1, 2 * num_params)


def _accepts_mask_mapping(model) -> bool:
    """Models that build one mask per attention type also take a ready ``{type: mask}`` dict."""
    base = getattr(model, "model", model)
    try:
        return "causal_mask_mapping" in inspect.getsource(type(base).forward)
    except (OSError, TypeError):
        return False


def _assemble(rows: list[ForwardRow], device) -> dict:
    """Left-padded inputs, positions, slot indices and the causal mask of a ragged batch."""
    b = len(rows)
    t = max(len(r.new_ids) for r in rows)
    length = max(len(r.slots) for r in rows)
    input_ids = torch.zeros((b, t), dtype=torch.long)
    position_ids = torch.zeros((b, t), dtype=torch.long)
    write_idx = torch.zeros((b, t), dtype=torch.long)
    gather_idx = torch.zeros((b, length), dtype=torch.long)
    lens = torch.tensor([len(r.slots) for r in rows])
    pad_query = torch.zeros((b, t), dtype=torch.bool)
    for i, r in enumerate(rows):
        n, total = len(r.new_ids), len(r.slots)
        input_ids[i, t - n :] = torch.tensor(r.new_ids)
        position_ids[i, t - n :] = torch.arange(total - n, total)
        write_idx[i, t - n :] = torch.tensor(r.slots[total - n :])
        gather_idx[i, :total] = torch.tensor(r.slots)
        pad_query[i, : t - n] = True
    span = _contiguous_span(rows[0].slots) if b == 1 else None
    return {
        "input_ids": input_ids.to(device),
        "position_ids": position_ids.to(device),
        "write_idx": write_idx.view(-1).to(device),
        "gather_idx": gather_idx.to(device),
        "lens": lens.to(device),
        "pad_query": pad_query.to(device),
        "span": span,
    }


def _bins(rows: list[ForwardRow]) -> list[list[int]]:
    """First-fit decreasing: row indices grouped so each group's new tokens fit the longest row's."""
    width = max(len(r.new_ids) for r in rows)
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(rows)), key=lambda i: -len(rows[i].new_ids)):
        n = len(rows[i].new_ids)
        j = next((j for j, free in enumerate(room) if free >= n), None)
        if j is None:
            bins.append([i])
            room.append(width - n)
        else:
            bins[j].append(i)
            room[j] -= n
    return bins


def _assemble_bins(rows: list[ForwardRow], bins: list[list[int]], device) -> dict:
    """(B', T) inputs of packed bins, left-padded; keys are each bin's members' slot lists one after
    another, and ``allowed`` (B', T, L) lets a query see its own member's keys up to its position."""
    width = max(sum(len(rows[i].new_ids) for i in m) for m in bins)
    length = max(sum(len(rows[i].slots) for i in m) for m in bins)
    nb = len(bins)
    input_ids = torch.zeros((nb, width), dtype=torch.long)
    position_ids = torch.zeros((nb, width), dtype=torch.long)
    write_idx = torch.zeros((nb, width), dtype=torch.long)
    gather_idx = torch.zeros((nb, length), dtype=torch.long)
    key_pos = torch.zeros((nb, length), dtype=torch.long)
    query_member = torch.full((nb, width), -1, dtype=torch.long)
    key_member = torch.full((nb, length), -2, dtype=torch.long)
    ends = []
    for b, members in enumerate(bins):
        q = width - sum(len(rows[i].new_ids) for i in members)  # left padding
        k, bin_ends = 0, []
        for i in members:
            r = rows[i]
            n, total = len(r.new_ids), len(r.slots)
            input_ids[b, q : q + n] = torch.tensor(r.new_ids)
            position_ids[b, q : q + n] = torch.arange(total - n, total)
            write_idx[b, q : q + n] = torch.tensor(r.slots[total - n :])
            query_member[b, q : q + n] = i
            gather_idx[b, k : k + total] = torch.tensor(r.slots)
            key_pos[b, k : k + total] = torch.arange(total)
            key_member[b, k : k + total] = i
            q, k = q + n, k + total
            bin_ends.append(q)
        ends.append(bin_ends)
    pad_query = query_member < 0
    allowed = (query_member[:, :, None] == key_member[:, None, :]) & (key_pos[:, None, :] <= position_ids[:, :, None])
    allowed[:, :, 0] |= pad_query  # padded queries attend to one key so softmax stays finite
    return {
        "input_ids": input_ids.to(device),
        "position_ids": position_ids.to(device),
        "write_idx": write_idx.view(-1).to(device),
        "gather_idx": gather_idx.to(device),
        "allowed": allowed.to(device),
        "key_pos": key_pos[:, None, :].to(device),
        "pad_query": pad_query.to(device),
        "ends": ends,
        "span": None,
    }


def _allowed(inputs) -> torch.Tensor:
    """Causal mask of a left-padded ragged batch: (B, T, L) bool."""
    position_ids, lens, pad_query = inputs["position_ids"], inputs["lens"], inputs["pad_query"]
    kpos = torch.arange(inputs["gather_idx"].shape[1], device=position_ids.device)
    allowed = (kpos <= position_ids.unsqueeze(-1)) & (kpos < lens.view(-1, 1, 1))
    allowed[:, :, 0] |= pad_query  # padded queries attend to one key so softmax stays finite
    return allowed


def _contiguous_span(slots: list[int]) -> tuple[int, int] | None:
    start = slots[0]
    if slots[-1] - start == len(slots) - 1 and slots == list(range(start, start + len(slots))):
        return start, start + len(slots)
    return None
