"""Prompt log-probabilities (``backends.scoring``): chunked recompute equals one no-cache forward."""

from __future__ import annotations

import pytest
import torch

from decodekit.api import LLM
from decodekit.backends.scoring import PromptScorer, score


def reference(logits_fn, ids, top_n):
    """log p(ids[i] | ids[:i]) from the model's own logits function, position by position."""
    out = [None]
    for i in range(1, len(ids)):
        logp = torch.log_softmax(logits_fn(ids[:i]).float(), -1)
        top = torch.topk(logp, top_n)
        out.append((ids[i], float(logp[ids[i]]), int((logp > logp[ids[i]]).sum()) + 1,
                    list(zip(top.indices.tolist(), top.values.tolist()))))
    return out


@pytest.mark.parametrize("chunk", [1, 3, 64])
def test_mock_scores_equal_the_reference_and_leave_the_cache_clean(mock, chunk):
    ids = [1, 5, 3, 3, 9, 2, 7, 1, 4]
    got = score(mock, ids, top_n=3, chunk_tokens=chunk)
    want = reference(mock.logits_fn, ids, 3)
    assert got[0] is None and len(got) == len(ids)
    for g, w in zip(got[1:], want[1:]):
        assert (g.token_id, g.rank) == (w[0], w[2])
        assert g.logprob == pytest.approx(w[1], abs=1e-6)
        assert [t for t, _ in g.top] == [t for t, _ in w[3]]
    assert mock.cache.num_open_handles == 0
    mock.cache.check_integrity()


def test_abandoned_scorer_releases_its_handle(mock):
    scorer = PromptScorer(mock, [1, 2, 3, 4, 5, 6], chunk_tokens=2)
    assert not scorer.step() and mock.cache.num_open_handles == 1
    scorer.close()
    assert mock.cache.num_open_handles == 0
    assert score(mock, [3]) == [None]
    with pytest.raises(ValueError):
        PromptScorer(mock, [])


@pytest.mark.real
def test_smollm_scores_equal_a_no_cache_forward(smollm):
    llm = LLM(backend=smollm)
    text = "The quick brown fox jumps over the lazy dog. " * 6
    ids = smollm.tokenizer.encode(text)
    llm.generate(text[:40], max_new_tokens=2, temperature=0)  # a cached prefix must not change the scores
    got = llm.score(ids, top_logprobs=2, chunk_tokens=16)
    model = smollm.model
    with torch.no_grad():
        logits = model(torch.tensor([ids], device=model.device)).logits[0].float()
    logp = torch.log_softmax(logits, -1)
    want = [float(logp[i - 1, ids[i]]) for i in range(1, len(ids))]
    assert max(abs(g.logprob - w) for g, w in zip(got[1:], want)) < 1e-3
    assert smollm.cache.num_open_handles == 0
