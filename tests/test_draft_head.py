"""Draft head (EAGLE-style): training-time unrolling equals inference-time chaining; lossless speculation."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama

from decodekit.backends.hf import HFBackend
from decodekit.backends.mock import MockTokenizer
from decodekit.drafting.drafters import HeadDrafter
from decodekit.drafting.head import DraftHead, HeadShape, load_head, save_head
from decodekit.engine import Engine
from decodekit.strategies.speculative import Speculative
from decodekit.training.draft_head import HeadRecipe, evaluate_head, fit_head, target_features, top_vocab, unrolled
from decodekit.types import SamplingParams


def _head(model, vocab=None):
    vocab = torch.arange(model.config.vocab_size) if vocab is None else vocab
    head = DraftHead(HeadShape.of(model.config), vocab).to(model.device).bind(model)
    head.init_from(model.model.layers[-1])
    return head.eval()


def test_unrolled_passes_equal_incremental_chain():
    model = tiny_llama(seed=2)
    head = _head(model)
    torch.manual_seed(0)
    t = 12
    ids = torch.randint(0, 128, (t,), device=model.device)
    feats = torch.randn(t, model.config.hidden_size, device=model.device)
    with torch.no_grad():
        passes = unrolled(head, ids, feats, 3)
        for j in (1, 4, 8):  # a chain whose first draft is entry j
            tokens, inputs = ids[1 : j + 1], feats[:j]
            out, past = head(tokens[None], inputs[None], torch.arange(1, j + 1, device=model.device))
            assert torch.allclose(out[0, -1], passes[0][j - 1], atol=1e-5)
            feature = out[:, -1:]
            for p in (2, 3):  # the p-th draft reads token j + p - 1 and the previous draft's feature
                pos = torch.tensor([j + p - 1], device=model.device)
                feature, past = head(ids[j + p - 1].view(1, 1), feature, pos, past)
                assert torch.allclose(feature[0, 0], passes[p - 1][j - 1], atol=1e-5), (j, p)


def test_training_raises_agreement_and_roundtrips(tmp_path):
    model = tiny_llama(seed=3)
    torch.manual_seed(0)
    # a learnable target: sequences the model itself continues greedily
    seqs = []
    with torch.no_grad():
        for _ in range(24):
            ids = torch.randint(0, 128, (1, 4), device=model.device)
            out = model.generate(ids, max_new_tokens=40, do_sample=False, pad_token_id=0)
            seqs.append(out[0].tolist())
    records = target_features(model, seqs, max_len=64, batch=5, log=None)
    # batched features equal one-at-a-time features
    single = target_features(model, seqs[:2], max_len=64, batch=1, log=None)
    assert torch.allclose(single[1]["features"].float(), records[1]["features"].float(), atol=2e-2)
    head = _head(model, top_vocab(records, 100))
    lookup = torch.full((128,), -1, dtype=torch.long, device=model.device)
    lookup[head.vocab_ids] = torch.arange(len(head.vocab_ids), device=model.device)
    before = evaluate_head(head, records, lookup)["top1_agreement"]
    head.train()
    after = fit_head(head, records, HeadRecipe(epochs=8, lr=1e-2, passes=2, val_fraction=0.0, warmup=5), log=None)
    assert after["top1_agreement"] > max(0.5, before + 0.15), (before, after)
    path = save_head(head.cpu(), "tiny", {"note": "test"}, tmp_path / "tiny")
    backend = HFBackend(model.cpu(), MockTokenizer(16), name="tiny")
    loaded = load_head(backend, path)
    assert torch.equal(loaded.vocab_ids, head.vocab_ids)
    assert torch.allclose(loaded.fc.weight, head.fc.weight)


def test_load_head_errors(tmp_path):
    backend = HFBackend(tiny_llama(), MockTokenizer(16), name="tiny")
    with pytest.raises(ValueError, match="no draft head"):
        load_head(backend, tmp_path / "missing")
    other = tiny_llama(hidden_size=32, num_attention_heads=2, num_key_value_heads=1)
    save_head(_head(other).cpu(), "other", {}, tmp_path / "other")
    with pytest.raises(ValueError, match="another model shape"):
        load_head(backend, tmp_path / "other")
    with pytest.raises(ValueError, match="Llama-style"):
        HeadShape.of(type("C", (), {"model_type": "gpt2"})())


def _engine_run(engine, prompts, params, strategy):
    requests = [engine.add_request(p, params, strategy) for p in prompts]
    while engine.has_unfinished():
        engine.step()
    return [engine.pop_completion(r.request_id) for r in requests]


PROMPTS = [[1, 5, 9, 13, 7, 12, 5, 9], [3, 4, 5, 6, 7, 8, 9, 10, 11, 3, 4, 5], [2, 2, 2]]


@pytest.mark.parametrize("k", [1, 3, "adaptive"])
def test_head_speculation_greedy_identical_and_cache_clean(k):
    model = tiny_llama(seed=0, vocab_size=16)
    backend = HFBackend(model, MockTokenizer(16), name="tiny", cache_tokens=2048)
    engine = Engine(backend)
    params = SamplingParams(max_new_tokens=40, temperature=0.0, ignore_eos=True)
    plain = _engine_run(engine, PROMPTS, params, None)
    head = _head(model, torch.arange(0, 16, 2))
    flat = (1.0,) * 17  # an untrained head is unsure: with free verify rows (alone or in a batch) it still drafts
    spec = Speculative(draft=HeadDrafter(backend, head, min_confidence=0.0), num_draft_tokens=k, verify_cost=flat,
                       width_cost=0.0)
    fast = _engine_run(engine, PROMPTS, params, spec)
    assert [c.token_ids for c in fast] == [c.token_ids for c in plain]
    assert sum(c.stats.extra["tokens_drafted"] for c in fast) > 0
    assert sum(c.stats.extra["tokens_accepted"] for c in fast) > 0
    backend.cache.check_integrity()
    assert backend.cache.num_open_handles == 0
    # an unsure head drafts less (drafting stops below the confidence floor), output unchanged
    unsure = _engine_run(engine, PROMPTS, params, Speculative(draft=HeadDrafter(backend, head, min_confidence=0.9),
                                                              num_draft_tokens=k, verify_cost=flat, width_cost=0.0))
    assert [c.token_ids for c in unsure] == [c.token_ids for c in plain]
    drafted = sum(c.stats.extra["tokens_drafted"] for c in unsure)
    assert drafted < sum(c.stats.extra["tokens_drafted"] for c in fast)
    with pytest.raises(ValueError, match="min_confidence"):
        HeadDrafter(backend, head, min_confidence=1.5)


def test_head_sampled_drafts_report_their_distribution():
    model = tiny_llama(seed=0, vocab_size=16)
    backend = HFBackend(model, MockTokenizer(16), name="tiny", cache_tokens=2048)
    drafter = HeadDrafter(backend, _head(model, torch.arange(0, 16, 2)), min_confidence=0.0)
    engine = Engine(backend)
    params = SamplingParams(max_new_tokens=30, temperature=0.9, top_k=5, seed=1, ignore_eos=True)
    seen = []
    original = drafter.propose

    def spy(ctx, seqs, ks):
        drafts = original(ctx, seqs, ks)
        seen.extend(d for d in drafts if d.tokens)
        return drafts

    drafter.propose = spy
    out = _engine_run(engine, PROMPTS[:2], params, Speculative(draft=drafter, num_draft_tokens=3))
    assert all(len(c.token_ids) == 30 for c in out)
    assert seen
    for d in seen:
        assert d.q.shape == (len(d.tokens), 16)
        assert torch.allclose(d.q.sum(-1), torch.ones(len(d.tokens)), atol=1e-5)
        assert all(d.q[i, t] > 0 for i, t in enumerate(d.tokens))  # drawn from q
        assert ((d.q > 0).sum(-1) <= 5).all()  # top-k shapes q like p
        assert (d.q[:, 1::2] == 0).all()  # only the head's vocabulary


def test_features_are_kept_per_slot_and_survive_prefix_hits():
    model = tiny_llama(seed=5)
    backend = HFBackend(model, MockTokenizer(16), name="tiny", cache_tokens=1024)
    ids = [1, 2, 3, 4, 5, 6, 7, 8]
    early = backend.open(ids[:4])
    backend.forward([early], [ids[:4]])  # computed before capture: no features
    backend.capture_features()
    assert backend.first_featured(early, 4) is None
    first = backend.open(ids)
    backend.forward([first], [ids[len(first):]])
    backend.cache.commit(first, ids)
    backend.cache.release(first)
    backend.cache.release(early)
    again = backend.open(ids)  # a prefix-cache hit (all but the last token): the features are still there
    assert len(again) == len(ids) - 1
    with torch.no_grad():
        ref = model.model(input_ids=torch.tensor([ids], device=model.device)).last_hidden_state[0]
    start = backend.first_featured(again, 7)
    assert start in (0, 4)  # the first 4 positions' slots may be the early (uncaptured) handle's
    assert torch.allclose(backend.features_at(again, start, 7), ref[start:7], atol=1e-5)
    assert backend.features_at(again, 2, 8) is None  # past the handle
    backend.cache.release(again)
