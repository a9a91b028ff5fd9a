"""The llama.cpp backend: a GGUF model run by llama.cpp (``llama-cpp-python``'s low-level API) with
decodekit's cache manager driving llama.cpp's own multi-sequence KV cache.

A KV handle is a llama.cpp sequence. The logical verbs map to llama.cpp's memory calls: fork =
``llama_memory_seq_cp`` (the cells are shared, nothing is copied, in a unified KV cache), truncate =
``llama_memory_seq_rm`` from a position on, release = remove the sequence. The radix prefix cache keeps
the cells it adopted alive in *holder* sequences of its own (one per committing handle) and evicts them
by removing their positions; a handle opened on a cached prefix copies it from the holders. Each
engine step is one ``llama_decode`` over every row (prefill chunks, decode, verify rows, particles and
tree leaves side by side); logits come back as one (outputs, vocab) float32 array, copied once.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import numpy as np
import torch

from decodekit.backends.base import Backend
from decodekit.cache import CacheFullError, CacheManager, KVHandle
from decodekit.cache.base import KVStorage
from decodekit.profiles import LLAMACPP_CPU_PROFILE

MAX_SEQUENCES = 256  # llama.cpp's LLAMA_MAX_SEQ: sequence ids for handles and prefix-cache holders
CELL_MARGIN = 64  # physical cells above the logical pool: the pool, not llama.cpp, runs out first
CELL_PAD = 256  # llama.cpp's KV size must be a multiple of its padding (256 with flash attention)


def require_llama_cpp():
    try:
        import llama_cpp
    except ImportError as e:
        raise ValueError("backend='llamacpp' needs llama-cpp-python: pip install 'decodekit[llamacpp]' "
                         "(builds llama.cpp from source, ~20 min on 2 cores; a prebuilt wheel: "
                         "pip install --find-links <dir> llama-cpp-python==0.3.36)") from e
    return llama_cpp


class _Batch:
    """A reusable ``llama_batch`` whose arrays are numpy buffers of ours (filled without per-token ctypes)."""

    def __init__(self, llama_cpp, capacity: int):
        self.capacity = capacity
        self.token = np.zeros(capacity, np.int32)
        self.pos = np.zeros(capacity, np.int32)
        self.n_seq = np.ones(capacity, np.int32)
        self.seq = np.zeros(capacity, np.int32)
        self.logits = np.zeros(capacity, np.int8)
        int_p = ctypes.POINTER(ctypes.c_int32)
        base = self.seq.ctypes.data
        self._seq_ptrs = (int_p * capacity)(*[ctypes.cast(base + 4 * i, int_p) for i in range(capacity)])
        batch = llama_cpp.llama_batch()
        batch.token = self.token.ctypes.data_as(ctypes.POINTER(llama_cpp.llama_token))
        batch.embd = None
        batch.pos = self.pos.ctypes.data_as(ctypes.POINTER(llama_cpp.llama_pos))
        batch.n_seq_id = self.n_seq.ctypes.data_as(int_p)
        batch.seq_id = self._seq_ptrs
        batch.logits = self.logits.ctypes.data_as(ctypes.POINTER(ctypes.c_int8))
        self.batch = batch

    def fill(self, rows: list[tuple[int, int, list[int], int]]) -> int:
        """Rows of (sequence, start position, token ids, logits wanted); returns the token count."""
        n = 0
        for seq, start, ids, k in rows:
            m = len(ids)
            self.token[n : n + m] = ids
            self.pos[n : n + m] = np.arange(start, start + m, dtype=np.int32)
            self.seq[n : n + m] = seq
            self.logits[n : n + m - k] = 0
            self.logits[n + m - k : n + m] = 1
            n += m
        self.batch.n_tokens = n
        return n


class LlamaSequences(KVStorage):
    """The cache manager's verbs on llama.cpp sequences.

    Every open handle owns one sequence holding exactly its positions ``0..len-1``. Prefix-cache slots
    are kept by holder sequences: ``holder_of[slot]`` contains that slot's cell at its position, so a
    cached prefix survives its handles and a new handle copies it run by run."""

    def __init__(self, llama_cpp, memory, max_sequences: int):
        self.L = llama_cpp
        self.memory = memory
        self.free_ids = list(range(max_sequences - 1, -1, -1))
        self.seq_of: dict[int, int] = {}  # handle id -> sequence
        self.holder_of: dict[int, int] = {}  # prefix-cache slot -> holder sequence
        self.holder_slots: dict[int, int] = {}  # holder sequence -> slots it keeps
        self.holder_by_handle: dict[int, int] = {}  # handle id -> the holder its commits go to
        self.make_room = None  # set by the backend: evict the prefix cache's least recent leaf

    # ---- sequence ids -----------------------------------------------------------------------
    def _new_sequence(self) -> int:
        while not self.free_ids and self.make_room is not None and self.make_room():
            pass
        if not self.free_ids:
            raise CacheFullError(f"llama.cpp sequence ids exhausted: {len(self.seq_of)} open KV handles and "
                                 f"{len(self.holder_slots)} prefix-cache holders use all {MAX_SEQUENCES} "
                                 "(fewer particles, tree leaves or concurrent requests)")
        return self.free_ids.pop()

    def _drop_sequence(self, seq: int) -> None:
        self.L.llama_memory_seq_rm(self.memory, seq, -1, -1)
        self.free_ids.append(seq)

    def seq(self, handle: KVHandle) -> int:
        return self.seq_of[handle.hid]

    # ---- the manager's hooks ----------------------------------------------------------------
    def opened(self, handle) -> None:
        seq = self._new_sequence()
        self.seq_of[handle.hid] = seq
        for holder, start, stop in self._runs(handle.slots, 0):
            self.L.llama_memory_seq_cp(self.memory, holder, seq, start, stop)

    def forked(self, source, handle) -> None:
        seq = self._new_sequence()
        self.seq_of[handle.hid] = seq
        self.L.llama_memory_seq_cp(self.memory, self.seq_of[source.hid], seq, -1, -1)

    def truncated(self, handle, n: int) -> None:
        self.L.llama_memory_seq_rm(self.memory, self.seq_of[handle.hid], n, -1)

    def released(self, handle) -> None:
        self._drop_sequence(self.seq_of.pop(handle.hid))
        self.holder_by_handle.pop(handle.hid, None)

    def committed(self, handle, start: int, switched: list[int]) -> None:
        seq = self.seq_of[handle.hid]
        stop = len(handle.slots)
        if start < stop:
            holder = self.holder_by_handle.get(handle.hid)
            if holder is None:
                holder = self.holder_by_handle[handle.hid] = self._new_sequence()
                self.holder_slots[holder] = 0
            self.L.llama_memory_seq_cp(self.memory, seq, holder, start, stop)
            for slot in handle.slots[start:stop]:
                self.holder_of[slot] = holder
            self.holder_slots[holder] += stop - start
        for first, last in _position_runs(switched):  # use the cache's cells, free our duplicates
            self.L.llama_memory_seq_rm(self.memory, seq, first, last)
            for holder, a, b in self._runs(handle.slots[first:last], first):
                self.L.llama_memory_seq_cp(self.memory, holder, seq, a, b)

    def evicted(self, slots: list[int], start: int) -> None:
        for holder, a, b in self._runs(slots, start):
            self.L.llama_memory_seq_rm(self.memory, holder, a, b)
            self.holder_slots[holder] -= b - a
            if self.holder_slots[holder] == 0:
                del self.holder_slots[holder]
                self.holder_by_handle = {h: s for h, s in self.holder_by_handle.items() if s != holder}
                self._drop_sequence(holder)
        for slot in slots:
            del self.holder_of[slot]

    def _runs(self, slots: list[int], start: int):
        """(holder, first position, end position) runs of prefix-cache slots at positions ``start...``."""
        runs: list[list[int]] = []
        for i, slot in enumerate(slots):
            holder = self.holder_of[slot]
            if runs and runs[-1][0] == holder and runs[-1][2] == start + i:
                runs[-1][2] += 1
            else:
                runs.append([holder, start + i, start + i + 1])
        return [tuple(r) for r in runs]

    def check(self, handles: list[KVHandle]) -> None:
        """Every live handle's sequence ends where its length says; holders keep what they claim."""
        for handle in handles:
            top = self.L.llama_memory_seq_pos_max(self.memory, self.seq_of[handle.hid])
            if top != len(handle) - 1:
                raise AssertionError(f"llama.cpp sequence of handle {handle.hid} ends at position {top}, "
                                     f"decodekit's length is {len(handle)}")
        counts: dict[int, int] = {}
        for holder in self.holder_of.values():
            counts[holder] = counts.get(holder, 0) + 1
        if counts != self.holder_slots:
            raise AssertionError(f"prefix-cache holders {self.holder_slots} != the slots they keep {counts}")
        used = set(self.seq_of.values()) | set(self.holder_slots)
        if len(used) != len(self.seq_of) + len(self.holder_slots) or used & set(self.free_ids):
            raise AssertionError("a llama.cpp sequence id is used twice or both used and free")


def _position_runs(positions: list[int]) -> list[tuple[int, int]]:
    runs: list[list[int]] = []
    for p in positions:
        if runs and runs[-1][1] == p:
            runs[-1][1] += 1
        else:
            runs.append([p, p + 1])
    return [tuple(r) for r in runs]


class LlamaCppBackend(Backend):
    """A GGUF model on llama.cpp; every strategy runs on it token by token, unchanged.

    ``n_ctx``: KV cells (the cache manager's capacity); ``n_threads``: llama.cpp's threads (default: the
    CPU cores; torch, which only samples here, gets one thread so the two do not fight);
    ``n_gpu_layers``: layers offloaded by a CUDA / Metal build of llama.cpp (0 on CPU builds)."""

    def __init__(self, model_path: str | Path, tokenizer, *, name: str, n_ctx: int = 8192,
                 n_threads: int | None = None, n_gpu_layers: int = 0, n_batch: int = 2048,
                 prefix_cache: bool = True, torch_threads: int | None = 1):
        super().__init__()
        L = require_llama_cpp()
        if not isinstance(n_ctx, int) or n_ctx < 64:
            raise ValueError(f"n_ctx must be an integer >= 64, got {n_ctx!r}")
        threads = n_threads or len(os.sched_getaffinity(0))
        if not isinstance(threads, int) or threads < 1:
            raise ValueError(f"n_threads must be a positive integer, got {n_threads!r}")
        self.L = L
        _quiet(L)
        L.llama_backend_init()
        params = L.llama_model_default_params()
        params.n_gpu_layers = int(n_gpu_layers)
        self.llama_model = L.llama_model_load_from_file(str(model_path).encode(), params)
        if not self.llama_model:
            raise ValueError(f"llama.cpp could not load {model_path}")
        cells = -(-(n_ctx + CELL_MARGIN) // CELL_PAD) * CELL_PAD  # llama.cpp asserts a whole number of pads
        params = _context_params(L, cells, n_batch, threads)
        self.llama_ctx = L.llama_init_from_model(self.llama_model, params)
        if not self.llama_ctx:
            raise ValueError(f"llama.cpp could not create a context of {n_ctx} cells for {model_path}")
        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.n_threads = threads
        self.n_batch = n_batch
        self.name = name
        self.tokenizer = tokenizer
        self.model_path = str(model_path)
        vocab = L.llama_model_get_vocab(self.llama_model)
        self.vocab_size = L.llama_vocab_n_tokens(vocab)
        self.max_context = min(L.llama_model_n_ctx_train(self.llama_model), n_ctx)
        self.num_params = int(L.llama_model_n_params(self.llama_model))
        self.device = torch.device("cpu")  # logits live on the host, whatever llama.cpp offloads
        self.memory = L.llama_get_memory(self.llama_ctx)
        self.sequences = LlamaSequences(L, self.memory, min(MAX_SEQUENCES, L.llama_n_seq_max(self.llama_ctx)))
        self.cache = CacheManager(n_ctx, prefix_cache=prefix_cache, storage=self.sequences)
        self.sequences.make_room = self._evict_one_leaf
        # admission keeps open handles to half the sequence ids: the other half is for the prefix cache's
        # holders, of which the handles' locked prefixes may need about one each (the rest are evictable)
        self.max_lanes = len(self.sequences.free_ids) // 2
        self._batch = _Batch(L, n_batch)
        self.key_cost = 0.0
        self.default_profile = None if n_gpu_layers else LLAMACPP_CPU_PROFILE

    # ---- the forward --------------------------------------------------------------------------
    def forward_rows(self, rows):
        raise NotImplementedError("the llama.cpp backend places its own cells: use forward(handles, ...)")

    def forward(self, handles: list[KVHandle], new_ids: list[list[int]], num_logits=1) -> list[torch.Tensor]:
        """One ``llama_decode`` over every row (more only past ``n_batch`` tokens); row i appends
        ``new_ids[i]`` to ``handles[i]`` at its start position and gets logits for its last positions."""
        if len(handles) != len(new_ids):
            raise ValueError("forward needs one list of new ids per handle")
        counts = num_logits if isinstance(num_logits, list) else [num_logits] * len(handles)
        if any(not ids for ids in new_ids):
            raise ValueError("forward needs at least one new token per row")
        self.cache.ensure_free(sum(len(ids) for ids in new_ids))
        seq = self.sequences.seq
        rows, starts = [], []
        for handle, ids, k in zip(handles, new_ids, counts):
            starts.append(len(handle))
            rows.append((seq(handle), len(handle), list(ids), min(k, len(ids))))
            self.cache.extend(handle, len(ids))
        try:
            logits = self._decode_all(rows)
        except CacheFullError:
            for handle, start in zip(handles, starts):
                self.cache.truncate(handle, start)
            raise
        self.num_forward_calls += 1
        self.num_forward_tokens += sum(len(ids) for ids in new_ids)
        out, at = [], 0
        for _, _, _, k in rows:
            out.append(logits[at : at + k])
            at += k
        return out

    def _decode_all(self, rows) -> torch.Tensor:
        chunks: list[torch.Tensor] = []
        for part in _chunks(rows, self.n_batch):
            n = self._batch.fill(part)
            rc = self.L.llama_decode(self.llama_ctx, self._batch.batch)
            if rc == 1:
                raise CacheFullError("llama.cpp found no free KV cell for this step")
            if rc != 0:
                raise RuntimeError(f"llama_decode failed with status {rc}")
            outputs = int(self._batch.logits[:n].sum())
            array = np.ctypeslib.as_array(self.L.llama_get_logits(self.llama_ctx), shape=(outputs, self.vocab_size))
            chunks.append(torch.from_numpy(array.copy()))
        return chunks[0] if len(chunks) == 1 else torch.cat(chunks)

    # ---- the rest of the contract ------------------------------------------------------------
    def capture_features(self) -> None:
        raise ValueError("the llama.cpp backend does not capture hidden states: a draft head needs the target's "
                         "final hidden state at every position, which llama.cpp returns only instead of "
                         "logits for a position (embeddings mode); use n-gram or draft-model speculation here")

    def check_integrity(self) -> None:
        """The cache manager's own checks plus decodekit's lengths against llama.cpp's positions."""
        self.cache.check_integrity()
        self.sequences.check(list(self.cache._handles.values()))

    def _evict_one_leaf(self) -> bool:
        tree = self.cache.tree
        before = tree.num_cached_tokens
        tree.evict(1)
        return tree.num_cached_tokens < before

    def close(self) -> None:
        if getattr(self, "llama_ctx", None):
            self.L.llama_free(self.llama_ctx)
            self.llama_ctx = None
        if getattr(self, "llama_model", None):
            self.L.llama_model_free(self.llama_model)
            self.llama_model = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: the library may be gone already
            pass


def _chunks(rows, limit: int):
    """Rows split into decode calls of at most ``limit`` tokens (a long row continues in the next call)."""
    part, size = [], 0
    for seq, start, ids, k in rows:
        while ids:
            room = limit - size
            take, rest = ids[:room], ids[room:]
            part.append((seq, start, take, max(0, k - len(rest))))
            size += len(take)
            start += len(take)
            ids = rest
            if size == limit:
                yield part
                part, size = [], 0
    if part:
        yield part


def _context_params(L, cells: int, n_batch: int, threads: int):
    params = L.llama_context_default_params()
    params.n_ctx = cells
    params.n_batch = n_batch
    params.n_ubatch = min(512, n_batch)
    params.n_seq_max = min(MAX_SEQUENCES, L.llama_max_parallel_sequences())
    params.kv_unified = True  # one cell pool for every sequence: forks share cells, nothing is split per sequence
    params.swa_full = True  # sliding-window models (Gemma 3) keep every cell, so truncation works anywhere
    params.n_outputs_max = 0  # = n_batch: verify rows want logits at several positions of one sequence
    params.n_outputs_max_per_seq = 0
    params.n_threads = threads
    params.n_threads_batch = threads
    params.no_perf = True
    return params


_LOG_CALLBACK = None


def _quiet(L) -> None:
    """llama.cpp logs every load to stderr; keep errors only (``DECODEKIT_LLAMA_LOG=1`` shows all)."""
    global _LOG_CALLBACK
    if _LOG_CALLBACK is not None or os.environ.get("DECODEKIT_LLAMA_LOG"):
        return

    @L.llama_log_callback
    def callback(level, text, user_data):
        if level == 4:  # GGML_LOG_LEVEL_ERROR
            os.write(2, text)

    _LOG_CALLBACK = callback
    L.llama_log_set(callback, ctypes.c_void_p(0))
