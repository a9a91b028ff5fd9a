"""Direct llama-cpp-python loops, the peer decodekit-on-llama.cpp is measured against (and the tests'
reference): greedy at one sequence, and one ``llama_decode`` per step over sequences forked from a
prompt with ``llama_memory_seq_cp``. Written against the low-level API only (no decodekit code), the
way a user driving llama.cpp by hand would write it."""

from __future__ import annotations

import time

import numpy as np

# llama.cpp's logits for the same tokens move with how they were computed (one batched prefill vs token by
# token, a verify row vs single steps, the number of KV cells in use): measured up to ~0.5-1.0 (max over the
# vocabulary) on SmolLM2 Q4_1 past ~200 positions, with direct llama.cpp alone. Two greedy runs may part only
# where the top two logits of the reference lie closer than that.
NEAR_TIE = 1.0


class DirectLlama:
    """One llama.cpp model and context, driven by hand."""

    def __init__(self, model_path: str, *, n_ctx: int = 4096, n_threads: int = 2, n_seq_max: int = 16,
                 flash_attn: int = -1):
        import llama_cpp as L

        self.L = L
        L.llama_backend_init()
        mp = L.llama_model_default_params()
        mp.n_gpu_layers = 0
        self.model = L.llama_model_load_from_file(str(model_path).encode(), mp)
        cp = L.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_seq_max = n_ctx, 2048, 512, n_seq_max
        cp.kv_unified, cp.n_outputs_max, cp.n_outputs_max_per_seq = True, 0, 0
        cp.n_threads = cp.n_threads_batch = n_threads
        cp.no_perf = True
        cp.flash_attn_type = flash_attn
        self.ctx = L.llama_init_from_model(self.model, cp)
        self.memory = L.llama_get_memory(self.ctx)
        self.vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model))
        self.batch = L.llama_batch_init(2048, 0, 1)

    def decode(self, rows: list[tuple[int, int, list[int]]]) -> np.ndarray:
        """Rows of (sequence, start position, token ids); logits of each row's last token, in row order."""
        b, n = self.batch, 0
        for seq, start, ids in rows:
            for i, tok in enumerate(ids):
                b.token[n], b.pos[n], b.n_seq_id[n] = tok, start + i, 1
                b.seq_id[n][0] = seq
                b.logits[n] = i == len(ids) - 1
                n += 1
        b.n_tokens = n
        if self.L.llama_decode(self.ctx, b) != 0:
            raise RuntimeError("llama_decode failed")
        out = self.L.llama_get_logits(self.ctx)
        return np.ctypeslib.as_array(out, shape=(len(rows), self.vocab)).copy()

    def clear(self) -> None:
        self.L.llama_memory_clear(self.memory, True)

    def greedy(self, ids: list[int], n: int) -> tuple[list[int], list[np.ndarray], float]:
        """``n`` greedy tokens after ``ids`` at one sequence: tokens, each step's logits, decode seconds."""
        self.clear()
        logits = [self.decode([(0, 0, list(ids))])[0]]
        tokens = [int(logits[-1].argmax())]
        start = time.perf_counter()
        for i in range(n - 1):
            logits.append(self.decode([(0, len(ids) + i, [tokens[-1]])])[0])
            tokens.append(int(logits[-1].argmax()))
        return tokens, logits, time.perf_counter() - start

    def forked_greedy(self, ids: list[int], n: int, width: int) -> tuple[list[list[int]], float]:
        """``width`` sequences forked from one prefilled prompt, ``n`` greedy tokens each, one
        ``llama_decode`` per step over all of them: tokens per sequence, decode seconds."""
        self.clear()
        first = int(self.decode([(0, 0, list(ids))])[0].argmax())
        for seq in range(1, width):
            self.L.llama_memory_seq_cp(self.memory, 0, seq, -1, -1)
        tokens = [[first] for _ in range(width)]
        start = time.perf_counter()
        for i in range(n - 1):
            logits = self.decode([(s, len(ids) + i, [tokens[s][-1]]) for s in range(width)])
            for s in range(width):
                tokens[s].append(int(logits[s].argmax()))
        return tokens, time.perf_counter() - start

    def batched_greedy(self, prompts: list[list[int]], n: int) -> tuple[list[list[int]], float]:
        """One sequence per prompt (prefilled together), ``n`` greedy tokens each, one ``llama_decode``
        per step over all of them: tokens per sequence, wall seconds (prefill included)."""
        self.clear()
        start = time.perf_counter()
        logits = self.decode([(s, 0, list(ids)) for s, ids in enumerate(prompts)])
        tokens = [[int(row.argmax())] for row in logits]
        for i in range(n - 1):
            logits = self.decode([(s, len(ids) + i, [tokens[s][-1]]) for s, ids in enumerate(prompts)])
            for s, row in enumerate(logits):
                tokens[s].append(int(row.argmax()))
        return tokens, time.perf_counter() - start

    def prefill_seconds(self, ids: list[int]) -> float:
        """Time to the first token's logits for ``ids`` (a cold cache)."""
        self.clear()
        start = time.perf_counter()
        for at in range(0, len(ids), 2048):
            self.decode([(0, at, list(ids[at : at + 2048]))])
        return time.perf_counter() - start

    def close(self) -> None:
        self.L.llama_batch_free(self.batch)
        self.L.llama_free(self.ctx)
        self.L.llama_model_free(self.model)


__all__ = ["NEAR_TIE", "DirectLlama"]
