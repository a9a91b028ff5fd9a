"""llguidance: the exact token-mask engine for regex, JSON Schema, Lark grammars and choices.

One grammar is compiled once per (constraint, tokenizer) (``Constraint.index``); each running
sequence, SMC particle and tree branch holds its own ``MatcherState``, an ``llguidance.LLMatcher``
advanced with each committed token. States are values: ``GuidanceIndex.next`` advances a copy
(``deep_copy``, ~1 µs), so a fork (a particle copy, a resampled survivor) is the same object shared
until either side advances, and a rejected speculative draft leaves the sequence's state where it
was (verifying a draft walks copies; ``rollback`` is the matcher's own verb for callers that
advance in place). Masks are llguidance's packed bitmasks (int32 words, 32 tokens each), filled
into a reusable buffer and unpacked or applied to logits without a Python walk over the vocabulary.
``GuidanceIndex.prefetch`` fills the next masks of many states (Rust, the GIL released during each
fill): strategies queue it beside the step's forward (``ctx.beside_forward``), so a draw finds its
allowed ids computed; a state not prefetched computes them when asked, the same ids.

EOS never comes from the mask: the strategies allow it where the constraint's own ``complete_ok``
holds (``jsonschema`` for JSON), so the last word on validity stays exact.
"""

from __future__ import annotations

import time

import torch

from decodekit.constraints.tokens import token_bytes

_ATTR = "_decodekit_lltokenizer"
_EXECUTOR = None  # llguidance's thread pool for batched masks (``prefetch``), made on first use
# True: ``prefetch`` fills a batch in one call on llguidance's pool. Off: on a CPU whose cores all run the
# forward, the pool's threads slowed it (json/8 on 2 cores, interleaved: 0.72x and 0.80x of no overlap,
# vs 1.15x for one matcher at a time on the worker thread); worth trying where cores are idle (GPU hosts).
PREFETCH_POOL = False
_SHIFTS = torch.arange(32, dtype=torch.int32)  # bit i of a mask word is token 32 * word + i


def _llguidance():
    try:
        import llguidance
    except ImportError as e:  # a core dependency: only a broken install lands here
        raise ImportError("llguidance is missing: pip install 'llguidance==1.9.*'") from e
    return llguidance


class _PieceTokenizer:
    """llguidance's ``TokenizerWrapper`` input for a tokenizer known by its token bytes (the mock).

    Special tokens (EOS) get llguidance's special-token spelling (``0xFF`` then a name)."""

    def __init__(self, tokenizer):
        pieces = token_bytes(tokenizer)
        self.eos_token_id = min(tokenizer.eos_token_ids)
        self.bos_token_id = getattr(tokenizer, "bos_token_id", None)
        self.special_token_ids = [i for i, p in enumerate(pieces) if p is None]
        self.tokens = [p if p else b"\xff[special_%d]" % i for i, p in enumerate(pieces)]
        self._by_bytes = {p: i for i, p in enumerate(pieces) if p}

    def __call__(self, text):
        data = text.encode() if isinstance(text, str) else bytes(text)
        out, i = [], 0
        while i < len(data):  # greedy longest match (the mock has one byte per token)
            for j in range(len(data), i, -1):
                if data[i:j] in self._by_bytes:
                    out.append(self._by_bytes[data[i:j]])
                    i = j
                    break
            else:
                i += 1  # a byte no token spells: skipped
        return out


def ll_tokenizer(tokenizer):
    """The ``llguidance.LLTokenizer`` of a decodekit tokenizer (every EOS id), built once (~1 s for a
    real vocabulary) and cached on the tokenizer object."""
    cached = getattr(tokenizer, _ATTR, None)
    if cached is not None:
        return cached
    llg = _llguidance()
    eos = sorted(tokenizer.eos_token_ids)
    hf = getattr(tokenizer, "hf", None)
    if hf is not None and not hasattr(tokenizer, "pieces"):
        from llguidance.hf import from_tokenizer

        cached = from_tokenizer(hf, n_vocab=len(token_bytes(tokenizer)), eos_token=eos)
    else:
        cached = llg.LLTokenizer(llg.TokenizerWrapper(_PieceTokenizer(tokenizer)), eos_token=eos)
    try:
        setattr(tokenizer, _ATTR, cached)
    except AttributeError:
        pass
    return cached


def regex_grammar(pattern: str) -> str:
    return _llguidance().LLMatcher.grammar_from_regex(pattern)


def lark_grammar(lark_text: str) -> str:
    return _llguidance().LLMatcher.grammar_from_lark(lark_text)


def json_grammar(schema, *, compact: bool = True, whitespace_pattern: str | None = None) -> str:
    """llguidance's grammar for a JSON schema: compact separators (``,`` / ``:``, no whitespace) by
    default; ``compact=False`` allows flexible whitespace (or ``whitespace_pattern``)."""
    options = {"item_separator": ",", "key_separator": ":", "whitespace_flexible": not compact}
    if whitespace_pattern is not None:
        options = {"whitespace_flexible": True, "whitespace_pattern": whitespace_pattern}
    return _llguidance().LLMatcher.grammar_from_json_schema(schema, overrides=options)


def grammar_problems(grammar: str, tokenizer=None) -> str | None:
    """Why llguidance cannot model ``grammar`` exactly (an error, or keywords it ignores), or None."""
    llg = _llguidance()
    lltok = ll_tokenizer(tokenizer) if tokenizer is not None else None
    is_error, messages = llg.LLMatcher.validate_grammar_with_warnings(grammar, lltok)
    if is_error or messages:
        return "; ".join(m.strip() for m in messages)[:500] or "llguidance refuses the grammar"
    return None


def _executor():
    global _EXECUTOR
    if _EXECUTOR is None:
        _EXECUTOR = _llguidance().LLExecutor()
    return _EXECUTOR


class MatcherState:
    """One sequence's matcher after its committed tokens. Treat as immutable: advance with
    ``GuidanceIndex.next`` (a copy); the mask and forced tokens are computed once, on demand."""

    __slots__ = ("matcher", "num_tokens", "_ids", "__weakref__")

    def __init__(self, matcher, num_tokens: int = 0):
        self.matcher = matcher
        self.num_tokens = num_tokens
        self._ids: torch.Tensor | None = None

    def accepting(self) -> bool:
        return self.matcher.is_accepting()


class GuidanceIndex:
    """A compiled llguidance grammar for one tokenizer: the same interface as ``AutomatonIndex``
    (``initial`` / ``next`` / ``allowed``) plus packed bitmasks and forced tokens.

    ``vocab_size``: the tokenizer's size; masks are (V,) with V that size (callers pad to the logits).
    Mask times are recorded in ``mask_us`` (the last 4096; a prefetched batch records its mean per
    mask), the time draws spent getting their allowed ids in ``path_us`` (on the decode path: about
    nothing when prefetched beside the forward), compile time in ``compile_ms``.
    """

    engine = "llguidance"

    def __init__(self, grammar: str, tokenizer):
        llg = _llguidance()
        self._lltok = ll_tokenizer(tokenizer)
        self.vocab_size = len(token_bytes(tokenizer))
        start = time.perf_counter()
        matcher = llg.LLMatcher(self._lltok, grammar, log_level=0)
        self.compile_ms = (time.perf_counter() - start) * 1e3
        if matcher.is_error():
            raise ValueError(f"llguidance refuses the grammar: {matcher.get_error()[:300]}")
        self._initial = MatcherState(matcher)
        self._eos = [e for e in self._lltok.eos_tokens if e < self.vocab_size]
        self._words = (self._lltok.vocab_size + 31) // 32
        self._buffer = torch.empty((1, self._words), dtype=torch.int32)
        self.mask_us: list[float] = []
        self.path_us: list[float] = []

    def initial(self) -> MatcherState:
        return self._initial

    def next(self, state: MatcherState | None, token: int) -> MatcherState | None:
        """The state after ``token`` (a new object; ``state`` is unchanged); None if the grammar
        refuses it (a dead end)."""
        if state is None:
            return None
        matcher = state.matcher.deep_copy()
        if not matcher.consume_token(int(token)) or matcher.is_error():
            return None
        return MatcherState(matcher, state.num_tokens + 1)

    def advance(self, state: MatcherState | None, tokens: list[int]) -> tuple[int, MatcherState | None]:
        """(how many of ``tokens`` the grammar takes in a row, the state after them): one copy."""
        if state is None:
            return 0, None
        if not tokens:
            return 0, state
        matcher = state.matcher.deep_copy()
        kept = matcher.try_consume_tokens([int(t) for t in tokens])
        if matcher.is_error():
            return 0, state
        return kept, MatcherState(matcher, state.num_tokens + kept)

    def bitmask(self, state: MatcherState) -> torch.Tensor:
        """The packed mask (words,) int32 of ``state``; a fresh tensor."""
        start = time.perf_counter()
        state.matcher.unsafe_compute_mask_ptr(self._buffer.data_ptr(), self._words * 4)
        _record(self.mask_us, [(time.perf_counter() - start) * 1e6])
        return self._buffer[0].clone()

    def prefetch(self, states) -> None:
        """Compute ``allowed_ids`` of every state in ``states`` that lacks them (each state once), one
        matcher at a time on the calling thread (``PREFETCH_POOL``: in one call on llguidance's pool); the
        GIL is released while a mask fills. Safe beside the step's forward: only these states' caches are
        written, and nothing else reads them until the step's update."""
        todo = list({id(s): s for s in states if s is not None and s._ids is None}.values())
        if not todo:
            return
        words = torch.empty((len(todo), self._words), dtype=torch.int32)
        start = time.perf_counter()
        if PREFETCH_POOL:
            _executor().unsafe_compute_mask_ptr([(s.matcher, i) for i, s in enumerate(todo)], words.data_ptr(),
                                                self._words * 4, len(todo))
        else:  # one matcher at a time on the calling thread (each call releases the GIL)
            for i, state in enumerate(todo):
                state.matcher.unsafe_compute_mask_ptr(words[i].data_ptr(), self._words * 4)
        _record(self.mask_us, [(time.perf_counter() - start) * 1e6 / len(todo)] * len(todo))
        for state, row in zip(todo, words):
            state._ids = bitmask_ids(row, self.vocab_size, drop=self._eos)

    def allowed(self, state: MatcherState | None) -> torch.Tensor:
        """Bool mask (V,) of tokens the grammar allows in ``state`` (EOS included where the grammar
        accepts; callers decide EOS themselves). A new tensor each call."""
        mask = torch.zeros(self.vocab_size, dtype=torch.bool)
        if state is not None:
            mask[self.allowed_ids(state)] = True
        return mask

    def allowed_ids(self, state: MatcherState) -> torch.Tensor:
        """Ids (K,) int64 of the non-EOS tokens allowed in ``state``, ascending; computed once per state
        (the draw then works on these K tokens, not on the vocabulary). Callers must not modify it."""
        start = time.perf_counter()
        if state._ids is None:
            state._ids = bitmask_ids(self.bitmask(state), self.vocab_size, drop=self._eos)
        _record(self.path_us, [(time.perf_counter() - start) * 1e6])
        return state._ids

    def forced(self, state: MatcherState | None, limit: int) -> list[int]:
        """Tokens the grammar forces next (llguidance's fast-forward tokens), at most ``limit``."""
        if state is None or limit <= 0:
            return []
        return list(state.matcher.compute_ff_tokens())[:limit]


def _record(times: list[float], new: list[float]) -> None:
    times.extend(new)
    if len(times) > 4096:
        del times[:2048]


def bitmask_ids(words: torch.Tensor, vocab: int, drop=()) -> torch.Tensor:
    """Packed int32 words (W,) on the CPU -> ascending ids (K,) int64 of the set bits below ``vocab``,
    except the ids in ``drop``."""
    import numpy as np

    bits = np.unpackbits(words.numpy().view(np.uint8), bitorder="little")[:vocab]  # little-endian words
    bits[list(drop)] = 0
    return torch.from_numpy(np.flatnonzero(bits))


def unpack_bitmask(words: torch.Tensor, vocab: int) -> torch.Tensor:
    """Packed int32 words (..., W) -> bool (..., vocab): bit i of word w is token 32 w + i."""
    bits = (words.unsqueeze(-1) >> _SHIFTS.to(words.device)) & 1  # (..., W, 32)
    flat = bits.flatten(-2).bool()
    if flat.shape[-1] < vocab:
        pad = torch.zeros((*flat.shape[:-1], vocab - flat.shape[-1]), dtype=torch.bool, device=flat.device)
        flat = torch.cat([flat, pad], -1)
    return flat[..., :vocab]


def apply_bitmask(logits: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
    """``logits`` (B, V) or (V,) with every token outside the packed mask set to -inf (a new tensor,
    on the logits' device: only the (B, W) words travel)."""
    allowed = unpack_bitmask(words.to(logits.device), logits.shape[-1])
    return logits.masked_fill(~allowed, float("-inf"))


ENGINES = ("auto", "llguidance", "outlines", "checker")


def check_engine(engine: str, automaton: bool = True) -> str:
    """The engine a constraint was asked for: ``automaton=False`` (the older switch) means ``checker``."""
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    return "checker" if not automaton else engine


class _ByteVocab:
    """256 one-byte tokens and an EOS (id 256): llguidance's decisions byte by byte (validation)."""

    eos_token_id = 256
    bos_token_id = None
    special_token_ids = [256]
    tokens = [bytes([b]) for b in range(256)] + [b"\xff[EOS]"]

    def __call__(self, text):
        return list(text.encode() if isinstance(text, str) else bytes(text))


class ByteMatcher:
    """A grammar's matcher over single bytes: how far llguidance takes a text, and whether it ends there."""

    def __init__(self, grammar: str):
        llg = _llguidance()
        self._matcher = llg.LLMatcher(llg.LLTokenizer(llg.TokenizerWrapper(_ByteVocab())), grammar, log_level=0)
        if self._matcher.is_error():
            raise ValueError(f"llguidance refuses the grammar: {self._matcher.get_error()[:300]}")

    def accepts(self, data: bytes) -> tuple[int, bool]:
        """(bytes of ``data`` taken in a row, whether all of ``data`` is taken and complete)."""
        matcher = self._matcher.deep_copy()
        taken = matcher.try_consume_tokens(list(data))
        if taken < len(data) or matcher.is_error():
            return taken, False
        return taken, matcher.is_accepting()
