"""The llama.cpp backend: greedy identity with direct llama.cpp on the same GGUF, handles against
llama.cpp's own positions (a state machine), preemption, and every strategy's exactness on it."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch
from decodekit.bench.llamacpp_direct import NEAR_TIE  # llama.cpp's own numerical spread (see there)
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from decodekit import LLM
from decodekit.models import is_installed

pytestmark = [
    pytest.mark.real,
    pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                       reason="llama-cpp-python is not installed (pip install 'decodekit[llamacpp]')"),
    pytest.mark.skipif(not is_installed("smollm2-135m"), reason="smollm2-135m is not installed (README set-up)"),
]

QUESTIONS = ["What is the capital of France?", "Write a haiku about rain.", "List three fruits.",
             "Explain gravity to a child."]


@pytest.fixture(scope="module")
def llama():
    from decodekit.models import load_llamacpp_backend

    backend = load_llamacpp_backend("smollm2-135m", n_ctx=4096, n_threads=2)
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def direct():
    from decodekit.bench.llamacpp_direct import DirectLlama

    from decodekit.models import gguf_path

    ref = DirectLlama(gguf_path("smollm2-135m"), n_ctx=4096, n_threads=2)
    yield ref
    ref.close()


def chat_ids(backend, question: str) -> list[int]:
    return backend.tokenizer.apply_chat_template([{"role": "user", "content": question}])


def run(llm, ids_or_batch, **kwargs):
    """``llm.generate`` on token ids (one list, or a list of lists) as ready (text, ids) prompts."""
    single = isinstance(ids_or_batch[0], int)
    batch = [ids_or_batch] if single else ids_or_batch
    done = llm.generate([(llm.tokenizer.decode(ids), list(ids)) for ids in batch], **kwargs)
    return done[0] if single else done


def clean(backend) -> None:
    backend.check_integrity()
    assert backend.cache.num_open_handles == 0


def test_tokenizers_agree_with_llama_cpp(llama):
    """decodekit feeds token ids, so the models see the same input; its tokenizer (transformers, from the
    GGUF's vocabulary) also splits ordinary text as llama.cpp's does (runs of spaces may split differently:
    docs/llamacpp.md). SmolLM2 prepends no BOS on either side."""
    L = llama.L
    vocab = L.llama_model_get_vocab(llama.llama_model)
    assert not L.llama_vocab_get_add_bos(vocab) and not llama.tokenizer.prepend_bos
    texts = ["Hello world, how are you?", "def f(x):\n    return x ** 2  # café ünïcode 日本", "12,345.6 and 7 % of 8!"]
    for text in texts:
        buf = (L.llama_token * 256)()
        n = L.llama_tokenize(vocab, text.encode(), len(text.encode()), buf, 256, True, False)
        assert list(buf[:n]) == llama.tokenizer.encode(text), text
    assert llama.vocab_size == len(llama.tokenizer.hf)


def test_greedy_identical_to_direct_llama_cpp(llama, direct):
    llm = LLM(backend=llama)
    for question in QUESTIONS[:3]:
        ids = chat_ids(llama, question)
        want, _, _ = direct.greedy(ids, 64)
        got = run(llm, ids, temperature=0, max_new_tokens=64, ignore_eos=True)
        assert list(got.token_ids) == want, question
    clean(llama)


def test_batched_greedy_diverges_only_at_near_ties(llama, direct):
    llm = LLM(backend=llama)
    prompts = [chat_ids(llama, q) for q in QUESTIONS]
    batch = run(llm, prompts, temperature=0, max_new_tokens=40, ignore_eos=True)
    for ids, got in zip(prompts, batch):
        want, logits, _ = direct.greedy(ids, 40)
        assert_same_or_near_tie(got.token_ids, want, logits)
    clean(llama)


def assert_same_or_near_tie(got, want, logits) -> None:
    """``got`` equals the greedy ``want`` up to a position where ``logits`` (the reference's) nearly tie."""
    part = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), None)
    if part is not None:
        top2 = np.sort(logits[part])[-2:]
        assert top2[1] - top2[0] < NEAR_TIE, (part, top2)


def test_seeded_sampling_is_reproducible_and_n_forks(llama):
    llm = LLM(backend=llama)
    ids = chat_ids(llama, QUESTIONS[1])
    llama.reset_prefix_cache()  # the same cache state: a cached prompt computes its last token differently
    one = run(llm, ids, temperature=0.9, seed=7, max_new_tokens=24, n=3)
    llama.reset_prefix_cache()
    two = run(llm, ids, temperature=0.9, seed=7, max_new_tokens=24, n=3)
    assert [c.token_ids for c in one.choices] == [c.token_ids for c in two.choices]
    assert len({c.token_ids for c in one.choices}) > 1
    assert one.stats.prefill_tokens_computed <= len(ids)  # the other samples fork the prompt
    clean(llama)


def test_prefix_cache_reuses_cells_and_keeps_outputs(llama, direct):
    llm = LLM(backend=llama)
    llama.reset_prefix_cache()
    ids = chat_ids(llama, QUESTIONS[0])
    first = run(llm, ids, temperature=0, max_new_tokens=16, ignore_eos=True)
    again = run(llm, ids, temperature=0, max_new_tokens=16, ignore_eos=True)
    assert again.stats.cached_prompt_tokens == len(ids) - 1 and again.token_ids == first.token_ids
    assert list(first.token_ids) == direct.greedy(ids, 16)[0]
    llama.reset_prefix_cache()
    assert llama.cache.tree.num_cached_tokens == 0 and not llama.sequences.holder_slots
    clean(llama)


def test_preemption_with_a_tiny_cell_budget_keeps_outputs(llama, direct):
    from decodekit.models import load_llamacpp_backend

    prompts = [chat_ids(llama, q) for q in QUESTIONS]
    small = load_llamacpp_backend("smollm2-135m", n_ctx=160, n_threads=2)
    try:
        llm = LLM(backend=small, max_prefill_tokens=64)
        got = run(llm, prompts, temperature=0, max_new_tokens=48, ignore_eos=True)
        assert llm.engine.stats()["preemptions"] > 0
        for ids, c in zip(prompts, got):  # recomputed through the prefix cache after a preemption
            want, logits, _ = direct.greedy(ids, 48)
            assert_same_or_near_tie(c.token_ids, want, logits)
        clean(small)
    finally:
        small.close()


def test_logprobs_and_scores_equal_direct_logits(llama, direct):
    llm = LLM(backend=llama)
    ids = chat_ids(llama, QUESTIONS[2])
    tokens, logits, _ = direct.greedy(ids, 8)
    got = run(llm, ids, temperature=0, max_new_tokens=8, ignore_eos=True, logprobs=1)
    want = [float(torch.log_softmax(torch.from_numpy(lg), -1)[t]) for lg, t in zip(logits, tokens)]
    assert [i.logprob for i in got.choices[0].logprobs] == pytest.approx(want, abs=1e-4)
    scores = llm.score(ids + tokens, chunk_tokens=16)
    assert [s.logprob for s in scores[len(ids):]] == pytest.approx(want, abs=1e-4)
    clean(llama)


# ---- strategies on this backend ---------------------------------------------------------------


def test_speculative_greedy_identical(llama, direct):
    from decodekit.models import load_llamacpp_backend
    from decodekit.strategies import Speculative

    llm = LLM(backend=llama)
    prompts = [chat_ids(llama, "Repeat after me: the cat sat on the mat, the cat sat on the mat.")]
    prompts.append(chat_ids(llama, QUESTIONS[3]))
    # a fixed draft length: this is about exactness (this backend's profile drafts only where it pays)
    ngram = run(llm, prompts, strategy=Speculative(draft="ngram", num_draft_tokens=4), temperature=0,
                max_new_tokens=48, ignore_eos=True)
    for ids, c in zip(prompts, ngram):  # verify rows compute drafts in a batch: a near-tie may flip
        want, logits, _ = direct.greedy(ids, len(c.token_ids))
        assert_same_or_near_tie(c.token_ids, want, logits)
    assert ngram[0].stats.extra["target_forward_passes"] < len(ngram[0].token_ids)
    draft = load_llamacpp_backend("smollm2-135m", n_ctx=1024, n_threads=2)  # a second llama.cpp model
    try:
        model = run(llm, prompts[1], strategy=Speculative(draft=draft), temperature=0, max_new_tokens=24)
        want, logits, _ = direct.greedy(prompts[1], 24)
        assert_same_or_near_tie(model.token_ids, want, logits)
        assert model.stats.extra["acceptance_rate"] > 0.8
        clean(draft)
    finally:
        draft.close()
    with pytest.raises(ValueError, match="quantized"):
        run(llm, prompts[0], strategy=Speculative(draft="int8"), max_new_tokens=4)
    with pytest.raises(ValueError, match="hidden states"):
        llama.capture_features()
    clean(llama)


def test_constrained_masked_awrs_and_smc(llama):
    from decodekit.constraints import JsonSchema, Regex
    from decodekit.strategies import Constrained

    llm = LLM(backend=llama)
    schema = JsonSchema({"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                          "year": {"type": "integer"}},
                         "required": ["city", "year"], "additionalProperties": False})
    prompt = chat_ids(llama, "Give a city and a year as JSON.")
    c = run(llm, prompt, constraint=schema, max_new_tokens=40, seed=0)
    assert c.finish_reason == "stop" and schema.complete_ok(c.text), c.text
    date = Regex(r"\d{4}-\d{2}-\d{2}")
    for strategy in (Constrained(date, sampler="awrs"), Constrained(date, num_particles=4)):
        c = llm.generate("The date today is", strategy=strategy, max_new_tokens=14, seed=1)
        assert date.complete_ok(c.text) and c.finish_reason == "stop", (c.text, c.finish_reason)
    clean(llama)


def test_constrained_speculative_greedy_identical(llama):
    import test_constrained_speculative as cases

    cases.test_real_model_greedy_identical(llama)
    clean(llama)


def test_entropy_switch_verified_equals_large_greedy(llama, direct):
    from decodekit.models import load_llamacpp_backend
    from decodekit.strategies import EntropySwitch

    small = load_llamacpp_backend("smollm2-135m", n_ctx=1024, n_threads=2)
    try:
        prompt = chat_ids(llama, "Name three colors.")
        want, logits, _ = direct.greedy(prompt, 16)
        out = run(LLM(backend=llama), prompt, strategy=EntropySwitch(small=small, threshold=3.0, verify=0.0),
                  temperature=0, max_new_tokens=16, ignore_eos=True)
        assert_same_or_near_tie(out.token_ids, want, logits)  # verify rows are batched computations
        assert out.stats.extra["tokens_drafted"] > 0
        token = run(LLM(backend=llama), prompt, strategy=EntropySwitch(small=small, threshold=1.0),
                                            temperature=0, max_new_tokens=16)
        assert {p.source for p in token.choices[0].provenance} <= {"small", "large"}
        clean(small)
    finally:
        small.close()
    clean(llama)


def test_tree_rollout_logprobs_equal_direct(llama, direct):
    from decodekit import SamplingParams
    from decodekit.rollout.tree import TreeRollout

    prompt = chat_ids(llama, "What is 3 + 4?")
    tree = TreeRollout(segment_len=4, branch_factor=2, max_width=4, first_split=2, early_stop=None)
    before = llama.num_forward_tokens
    (r,) = tree.run(llama, [prompt], SamplingParams(max_new_tokens=8, seed=0, temperature=1.0))
    assert llama.num_forward_tokens - before == r.stats["forward_tokens"]
    assert len(r.trajectories) == 4 and r.stats["tree_tokens"] < r.stats["trajectory_tokens"]
    for t in r.trajectories:
        direct.clear()
        want = []
        for j, tok in enumerate(t.token_ids):
            ids = list(prompt) + list(t.token_ids[:j])
            logits = direct.decode([(0, 0, ids)])[0] if j == 0 else direct.decode([(0, len(ids) - 1, [ids[-1]])])[0]
            want.append(float(torch.log_softmax(torch.from_numpy(logits), -1)[tok]))
        assert t.logprobs == pytest.approx(want, abs=1e-4)
    clean(llama)


def test_huggingface_directory_names_the_converter(tmp_path):
    from decodekit.models import gguf_path

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="convert_hf_to_gguf"):
        gguf_path(str(tmp_path))
    with pytest.raises(ValueError, match="n_ctx"):
        LLM(backend="llamacpp", n_ctx=8)


# ---- handles against llama.cpp's own positions --------------------------------------------------


class HandleMachine(RuleBasedStateMachine):
    """Open (through the prefix cache), fork, extend, truncate, commit and release handles at random;
    after every operation decodekit's lengths equal llama.cpp's, every holder keeps what it claims, and
    at the end each live handle's next logits match a fresh direct computation of its tokens (same top
    token, within llama.cpp's own numerical spread)."""

    backend = None
    reference = None

    @initialize()
    def start(self):
        self.live: dict[int, tuple[object, list[int]]] = {}
        self.serial = 0

    def _add(self, handle, ids):
        self.live[self.serial] = (handle, ids)
        self.serial += 1

    @precondition(lambda self: len(self.live) < 8)
    @rule(prompt=st.integers(0, 3), extra=st.integers(0, 6))
    def open(self, prompt, extra):
        base = [1, 9690, 198, 2683, 359, 253, 5356, 28, 1675] + [300 + prompt] * 3 + [400 + i for i in range(extra)]
        handle = self.backend.cache.open(base)
        self.backend.forward([handle], [base[len(handle):]])
        self._add(handle, base)

    @precondition(lambda self: self.live and len(self.live) < 8)
    @rule(data=st.data())
    def fork(self, data):
        handle, ids = self.live[data.draw(st.sampled_from(sorted(self.live)))]
        self._add(self.backend.cache.fork(handle), list(ids))

    @precondition(lambda self: self.live)
    @rule(data=st.data(), n=st.integers(1, 4))
    def extend(self, data, n):
        keys = data.draw(st.lists(st.sampled_from(sorted(self.live)), min_size=1, max_size=3, unique=True))
        news = [[500 + (len(self.live[k][1]) * 7 + i) % 50 for i in range(n)] for k in keys]
        self.backend.forward([self.live[k][0] for k in keys], news, [n] * len(keys))
        for k, new in zip(keys, news):
            self.live[k][1].extend(new)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def truncate(self, data):
        handle, ids = self.live[data.draw(st.sampled_from(sorted(self.live)))]
        n = data.draw(st.integers(1, len(ids)))
        self.backend.cache.truncate(handle, n)
        del ids[n:]

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def commit(self, data):
        handle, ids = self.live[data.draw(st.sampled_from(sorted(self.live)))]
        self.backend.cache.commit(handle, ids)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def release(self, data):
        handle, _ = self.live.pop(data.draw(st.sampled_from(sorted(self.live))))
        self.backend.cache.release(handle)

    @rule()
    def evict(self):
        self.backend.cache.tree.evict(8)

    @invariant()
    def lengths_match_llama_cpp(self):
        self.backend.check_integrity()

    def teardown(self):
        pairs = []
        try:
            for handle, ids in list(self.live.values())[:3]:
                got = self.backend.forward([handle], [[42]])[0][-1].numpy()
                self.reference.clear()
                pairs.append((got, self.reference.decode([(0, 0, ids + [42])])[0]))
        finally:  # the next example starts clean even when this one failed
            for handle, _ in self.live.values():
                self.backend.cache.release(handle)
            self.backend.reset_prefix_cache()
        clean(self.backend)
        for got, want in pairs:  # llama.cpp's own numerics move with chunking and cells in use (NEAR_TIE);
            # a wrong or missing cell changes the distribution itself
            assert int(got.argmax()) == int(want.argmax()) and np.abs(got - want).max() < 2 * NEAR_TIE


def test_handles_follow_llama_cpp_positions(llama, direct):
    HandleMachine.backend, HandleMachine.reference = llama, direct
    llama.reset_prefix_cache()
    machine = HandleMachine.TestCase
    machine.settings = settings(max_examples=12, stateful_step_count=14, deadline=None,
                                suppress_health_check=list(HealthCheck))
    machine().runTest()
