"""Distillation code path on a tiny random teacher: layer cut, coarse KL, a few seeded steps, the alias."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama

from decodekit.backends.mock import MockTokenizer
from decodekit.cli import build_parser
from decodekit.models import resolve
from decodekit.training.distill import DistillConfig, coarse_kl, cut_student, distill, layer_indices, synthetic_prompts

PROMPTS = ["hello world", "abc def", "the cat sat", "x y z", "one two", "green tea", "7 and 5", "why?"]
TINY = DistillConfig(layers=2, num_prompts=8, gen_tokens=10, gen_batch=4, top_k=8, epochs=2, batch_size=2,
                     lr=1e-3, warmup=2, val_fraction=0.25, seed=3)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models, one thread


def teacher():
    model = tiny_llama(0, vocab_size=69, num_hidden_layers=4)
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)  # peaked distributions, so there is something to learn
    return model


def test_layer_indices():
    assert layer_indices(30, 6) == [0, 6, 12, 17, 23, 29]
    assert layer_indices(4, 2) == [0, 3]
    assert layer_indices(4, 1) == [3]
    assert layer_indices(4, 4) == [0, 1, 2, 3]
    for bad in (0, 5):
        with pytest.raises(ValueError, match="layers"):
            layer_indices(4, bad)


def test_cut_student_copies_layers_embeddings_and_head():
    t = teacher()
    full = cut_student(t, 4)
    ids = torch.tensor([[1, 5, 9, 2, 7]], device=t.device)
    with torch.no_grad():
        assert torch.allclose(full(input_ids=ids).logits, t(input_ids=ids).logits, atol=1e-5)
    s = cut_student(t, 2)
    assert s.config.num_hidden_layers == 2
    assert torch.equal(s.model.layers[1].mlp.up_proj.weight, t.model.layers[3].mlp.up_proj.weight)
    assert torch.equal(s.get_input_embeddings().weight, t.get_input_embeddings().weight)
    assert torch.equal(s.lm_head.weight, t.lm_head.weight)


def test_coarse_kl():
    g = torch.Generator().manual_seed(0)
    teacher_logits, student_logits = torch.randn(5, 12, generator=g), torch.randn(5, 12, generator=g)
    lp = torch.log_softmax(teacher_logits, -1)
    top_lp, top_id = lp.topk(12, dim=-1)  # k = V: the coarse KL is the exact KL
    exact = (lp.exp() * (lp - torch.log_softmax(student_logits, -1))).sum(-1).mean()
    assert float(coarse_kl(student_logits, top_lp, top_id)) == pytest.approx(float(exact), abs=1e-5)
    top_lp, top_id = lp.topk(4, dim=-1)
    assert float(coarse_kl(teacher_logits, top_lp, top_id)) == pytest.approx(0.0, abs=1e-5)
    assert 0.0 < float(coarse_kl(student_logits, top_lp, top_id)) <= float(exact) + 1e-6  # coarsening loses info


def test_distill_fits_and_is_reproducible():
    t = teacher()
    tok = MockTokenizer(69)
    a, report = distill(t, tok, TINY, prompts=PROMPTS, show_progress=False)
    assert report["kept_layers"] == [0, 3] and report["num_val_sequences"] == 2
    assert report["val_after"]["kl"] < report["val_before"]["kl"]
    assert torch.equal(a.get_input_embeddings().weight, t.get_input_embeddings().weight)  # frozen
    b, _ = distill(t, tok, TINY, prompts=PROMPTS, show_progress=False)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), name


def test_config_and_prompts():
    with pytest.raises(ValueError, match="epochs"):
        DistillConfig(epochs=0)
    with pytest.raises(ValueError, match="val_fraction"):
        DistillConfig(val_fraction=1.0)
    p = synthetic_prompts(10, seed=1)
    assert p == synthetic_prompts(10, seed=1) and len(set(p)) == 10 and p != synthetic_prompts(10, seed=2)


def test_cli_and_alias(monkeypatch, tmp_path):
    args = build_parser().parse_args(["distill", "--teacher", "smollm2-135m", "--layers", "4", "--epochs", "1"])
    assert (args.layers, args.epochs) == (4, 1)
    monkeypatch.setenv("DECODEKIT_CACHE", str(tmp_path))
    with pytest.raises(ValueError, match="decodekit distill --teacher smollm2-135m --layers 4"):
        resolve("smollm2-135m-distill-4l")
    target = tmp_path / "distill" / "smollm2-135m-distill-4l"
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")
    assert resolve("smollm2-135m-distill-4l") == (str(target), None, False)
    with pytest.raises(ValueError, match="unknown model"):
        resolve("nosuch-distill-4l")
