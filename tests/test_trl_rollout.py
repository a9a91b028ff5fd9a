"""decodekit as TRL's GRPOTrainer rollout function: on the trainer's own module, TRL's stop rules and
log-probabilities, the prefix cache dropped after a weight change, TreePO advantages in the final batch."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from conftest import tiny_llama

from decodekit import LLM, TreeRollout
from decodekit.models import wrap_module

trl = pytest.importorskip("trl", reason="trl is not installed: pip install 'decodekit[rl]' (make setup does)")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

from decodekit.integrations.trl import TREE_PATH, rollout_func  # noqa: E402
from decodekit.integrations.trl.packing import pack  # noqa: E402
from decodekit.integrations.trl.rollout import group_prompts  # noqa: E402
from decodekit.integrations.trl.trainer import TreePOTrainer, grouped_tree_advantages  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
CHARS = "abcdefghijklmnopqrstuvwxyz0123456789 +=?.,:"
WIDTH, MAX_TOKENS = 4, 12


def char_tokenizer():
    """A character-level fast tokenizer with a chat template, EOS and pad: no download."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<|im_end|>", "<|im_start|>"]
    vocab = {t: i for i, t in enumerate(specials + list(CHARS))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="?"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<|im_end|>")
    hf.chat_template = ("{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"
                        "{% if add_generation_prompt %}<|im_start|>{% endif %}")
    return hf


def tiny_policy(seed: int = 0):
    model = tiny_llama(seed=seed, vocab_size=len(CHARS) + 3, hidden_size=32, intermediate_size=64,
                       num_attention_heads=4, num_key_value_heads=2)
    model.generation_config.eos_token_id = 1
    with torch.no_grad():
        model.lm_head.weight[1] *= 60  # EOS (id 1) likely wherever its logit is positive: some completions end early
    return model.train()


def reward_digits(completions, **kwargs):
    return [float(sum(c.isdigit() for c in text)) for text in completions]


def make_trainer(tmp_path, rollout, *, cls=None, steps: int = 2, lr: float = 0.0, reward_funcs=None, **config):
    from datasets import Dataset
    from trl import GRPOConfig

    config = {"temperature": 0.9, **config}
    args = GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=2 * WIDTH, num_generations=WIDTH,
                      max_completion_length=MAX_TOKENS, max_steps=steps, learning_rate=lr, beta=0.0, bf16=False,
                      logging_steps=1, report_to="none", use_cpu=True, save_strategy="no", seed=0,
                      dataloader_num_workers=0, disable_tqdm=True, **config)
    data = Dataset.from_dict({"prompt": ["1+2=", "what is 3+4?", "7+1=", "say 42"]})
    cls = cls or trl.GRPOTrainer
    return cls(model=tiny_policy(), reward_funcs=reward_funcs or [reward_digits], args=args, train_dataset=data,
               processing_class=char_tokenizer(), rollout_func=rollout)


def padded_batch(trainer, out) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``cat(prompt, completion)`` ids and mask, and the completion mask, padded as TRL pads them."""
    from trl.trainer.utils import pad

    pad_id = trainer.processing_class.pad_token_id
    prompts = [torch.tensor(p) for p in out["prompt_ids"]]
    completions = [torch.tensor(c) for c in out["completion_ids"]]
    prompt_ids = pad(prompts, padding_value=pad_id, padding_side="left")
    prompt_mask = pad([torch.ones_like(p) for p in prompts], padding_value=0, padding_side="left")
    completion_ids = pad(completions, padding_value=pad_id, padding_side="right")
    completion_mask = pad([torch.ones_like(c) for c in completions], padding_value=0, padding_side="right")
    return torch.cat([prompt_ids, completion_ids], dim=1), torch.cat([prompt_mask, completion_mask], dim=1), \
        completion_mask


def trl_logprobs(trainer, out) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """TRL's own recomputation (``_get_per_token_logps_and_entropies``) on the batch, padded as TRL pads it."""
    from trl.trainer.utils import pad

    ids, mask, completion_mask = padded_batch(trainer, out)
    with torch.no_grad():
        theirs, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, mask, completion_mask.size(1))
    ours = pad([torch.tensor(lp) for lp in out["logprobs"]], padding_value=0.0, padding_side="right")
    return ours, theirs, completion_mask.bool()


@pytest.mark.parametrize("mode", ["tree", "independent"])
def test_logprobs_and_stops_match_trl(tmp_path, mode):
    rollout = rollout_func(mode, tree=TreeRollout(segment_len=3, branch_factor=2, first_split=2), seed=1)
    trainer = make_trainer(tmp_path, rollout)
    prompts = ["1+2="] * WIDTH + ["say 42"] * WIDTH
    out = rollout(prompts, trainer)
    assert len(out["completion_ids"]) == len(prompts) == len(out["logprobs"]) == len(out[TREE_PATH])
    eos = set(trainer.eos_token_ids)
    for ids, logps in zip(out["completion_ids"], out["logprobs"]):
        assert len(ids) == len(logps) >= 1
        assert len(ids) == MAX_TOKENS or ids[-1] in eos  # TRL's stops: EOS (kept) or max_completion_length
        assert not eos & set(ids[:-1])
    assert sum(ids[-1] in eos for ids in out["completion_ids"]) >= 4  # stopped by EOS, kept with its logprob
    assert out["prompt_ids"][0] == trainer._tokenize_prompts(["1+2="])[0][0]
    ours, theirs, mask = trl_logprobs(trainer, out)
    assert theirs.dtype == torch.float32 and mask.sum() > 20
    assert (ours - theirs)[mask].abs().max() <= 1e-4
    assert trainer.model.training and all(m.training for m in trainer.model.modules())
    paths = out[TREE_PATH]
    if mode == "tree":  # branched: some completions share a segment below the root
        assert len({tuple(p[:2]) for p in paths[:WIDTH]}) < WIDTH
    else:
        assert all(len(p) == 2 for p in paths)


def test_prompts_must_come_repeated():
    assert [s for s, _ in group_prompts(["a", "a", "b", "b"], 2)] == [0, 2]
    with pytest.raises(ValueError, match="repeated"):
        group_prompts(["a", "b", "a", "b"], 2)
    with pytest.raises(ValueError, match="multiple"):
        group_prompts(["a", "a", "a"], 2)


def test_wrapped_module_keeps_its_mode_and_weights():
    model = tiny_policy()
    model.model.layers[1].eval()  # a mixed-mode module gets each submodule's own mode back
    modes = [m.training for m in model.modules()]
    forward = {id(m): m.forward for m in model.modules() if isinstance(m, torch.nn.Linear)}
    llm = LLM.from_module(model, char_tokenizer(), cache_tokens=2048)
    result = llm.rollout("1+2=", tree=TreeRollout(segment_len=3, max_width=4, first_split=2, early_stop=None),
                         max_new_tokens=8, seed=0)
    assert len(result.trajectories) == 4
    assert [m.training for m in model.modules()] == modes
    assert not any(hasattr(m, "_packed_weight") for m in model.modules())
    assert {id(m): m.forward for m in model.modules() if isinstance(m, torch.nn.Linear)} == forward
    with pytest.raises(ValueError, match="cannot share a training module"):
        wrap_module(model, char_tokenizer(), backend="llamacpp")


def test_weight_change_drops_the_prefix_cache():
    model, tok = tiny_policy(), char_tokenizer()
    tree = TreeRollout(segment_len=3, max_width=4, first_split=2, early_stop=None)
    llm = LLM.from_module(model, tok, cache_tokens=2048)
    kwargs = dict(max_new_tokens=8, seed=3, temperature=0.9)
    llm.rollout("what is 3+4?", tree=tree, **kwargs)
    assert llm.backend.cache.tree.num_cached_tokens > 0
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, fused=True)  # TRL's default: no version bump
    ids = torch.tensor([tok("what is 3+4?")["input_ids"]])
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()  # the values move (a sample of them tells)
    stale = llm.backend.kv.keys[0].clone()
    after = llm.rollout("what is 3+4?", tree=tree, **kwargs)
    fresh = LLM.from_module(model, tok, cache_tokens=2048).rollout("what is 3+4?", tree=tree, **kwargs)
    assert [t.token_ids for t in after.trajectories] == [t.token_ids for t in fresh.trajectories]
    assert [lp for t in after.trajectories for lp in t.sample_logprobs] == pytest.approx(
        [lp for t in fresh.trajectories for lp in t.sample_logprobs], abs=1e-5)
    assert after.stats["prefill_tokens"] == fresh.stats["prefill_tokens"]  # no stale prefix hit
    assert not torch.equal(stale, llm.backend.kv.keys[0])
    # a separate inference copy takes the new weights through update_weights
    copy_llm = LLM.from_module(copy.deepcopy(tiny_policy()), tok, cache_tokens=2048)
    copy_llm.rollout("what is 3+4?", tree=tree, **kwargs)
    copy_llm.update_weights(model.state_dict())
    again = copy_llm.rollout("what is 3+4?", tree=tree, **kwargs)
    assert [t.token_ids for t in again.trajectories] == [t.token_ids for t in fresh.trajectories]


def test_weights_changed_under_open_handles_raise():
    model = tiny_policy()
    backend = wrap_module(model, char_tokenizer(), cache_tokens=256)
    handle = backend.open([3, 4, 5])
    backend.forward([handle], [[3, 4, 5]])
    with torch.no_grad():
        model.lm_head.weight.add_(0.1)
    with pytest.raises(RuntimeError, match="changed while requests hold K/V"):
        backend.forward([handle], [[6]])
    with pytest.raises(RuntimeError, match="handle"):
        backend.sync_weights()
    backend.cache.release(handle)
    assert backend.sync_weights() and not backend.sync_weights()


def test_grouped_tree_advantages():
    paths = [(0, 1, 3), (0, 1, 4), (0, 2), (0, 5)] * 2
    rewards = [1.0, 0.0, 0.0, 1.0, float("nan"), 2.0, 0.0, 0.0]
    adv = grouped_tree_advantages(paths, rewards, 4, normalize=None)
    assert adv[:4] == pytest.approx([0.5 * (0.5 + 0.5), 0.5 * (-0.5 - 0.5), -0.5, 0.5])
    assert adv[4] == 0.0 and adv[5] == pytest.approx(2.0 - 2.0 / 3) and adv[6] == pytest.approx(-2.0 / 3)


def test_two_grpo_steps_with_tree_rollouts_and_treepo_advantages(tmp_path):
    seen = {"batches": [], "modes": [], "rewards": []}

    def reward(completions, **kwargs):
        seen["modes"].append(trainer.model.training)
        seen["rewards"].append(reward_digits(completions))
        assert len(kwargs[TREE_PATH]) == len(completions)
        return seen["rewards"][-1]

    class Capturing(TreePOTrainer):
        def _generate_and_score_completions(self, inputs):
            out = super()._generate_and_score_completions(inputs)
            seen["batches"].append((out["advantages"].clone(), list(rollout.last_results)))
            return out

    rollout = rollout_func("tree", tree=TreeRollout(segment_len=3, branch_factor=2, first_split=2))
    trainer = make_trainer(tmp_path, rollout, cls=Capturing, lr=0.05, reward_funcs=[reward])
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()
    assert trainer.state.global_step == 2 and len(rollout.calls) == 2
    assert not all(torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))
    assert [c.weights_synced for c in rollout.calls] == [False, True]  # the step changed the weights
    assert len(trainer.pack_stats) == 2 and all(packed < rows for rows, packed in trainer.pack_stats)
    assert seen["modes"] == [True, True]
    for (advantages, results), rewards in zip(seen["batches"], seen["rewards"]):
        assert advantages.shape == (2 * WIDTH,)
        want = [a for g, result in enumerate(results)
                for a in result.tree_advantages(rewards[g * WIDTH:(g + 1) * WIDTH])]
        assert advantages.tolist() == pytest.approx(want, abs=1e-6)
        assert all(len(t.path) >= 2 for r in results for t in r.trajectories)


def test_pack_shares_prefixes_and_masks_siblings():
    # rows: prompt (left-padded) | completion (right-padded); rows 0 and 1 share prompt and first token
    ids = torch.tensor([[0, 5, 6, 7, 8, 1], [0, 5, 6, 7, 9, 0], [4, 5, 6, 7, 0, 0]])
    mask = torch.tensor([[0, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0]])
    packed = pack(ids, mask, 3)
    assert packed.ids.shape == (2, 6) and packed.num_tokens == 6 + 4  # 5 6 7 8 1 9 | 4 5 6 7
    assert packed.ids[0].tolist() == [5, 6, 7, 8, 1, 9] and packed.positions[0].tolist() == [0, 1, 2, 3, 4, 3]
    assert packed.index[0, 0] == packed.index[1, 0] and packed.index[0, 1] != packed.index[1, 1]
    assert packed.index[1, 2] == packed.index[2, 1] == packed.index[2, 2] == -1  # padding
    assert packed.labels[packed.index[0]].tolist() == [7, 8, 1]
    assert packed.pred_pos[packed.index[1, 1]] == 2  # "9" is predicted from "7", its parent
    assert packed.allowed[0, 5].tolist() == [True, True, True, False, False, True]  # "9" never sees "8"
    assert packed.allowed[1, 3, :4].all() and not packed.allowed[1, 3, 4:].any()


def test_packed_forward_equals_trl_rows_with_gradients(tmp_path):
    rollout = rollout_func("tree", tree=TreeRollout(segment_len=3, branch_factor=2, first_split=2), seed=3)
    trainer = make_trainer(tmp_path, rollout, cls=TreePOTrainer)
    out = rollout(["1+2="] * WIDTH + ["say 42"] * WIDTH, trainer)
    ids, mask, completion_mask = padded_batch(trainer, out)
    weights = torch.rand(completion_mask.shape, generator=torch.Generator().manual_seed(0)) * completion_mask
    params = [p for p in trainer.model.parameters() if p.requires_grad]

    def run(method):
        trainer.model.zero_grad()
        logps, entropy, _ = method(trainer, trainer.model, ids, mask, completion_mask.size(1), compute_entropy=True)
        (logps * weights).sum().backward()  # a per-position weighting: shared tokens' gradients must add up
        return logps.detach(), entropy.detach(), [p.grad.clone() for p in params]

    theirs = run(trl.GRPOTrainer._get_per_token_logps_and_entropies)
    ours = run(TreePOTrainer._get_per_token_logps_and_entropies)
    keep = completion_mask.bool()
    assert trainer.pack_stats and trainer.pack_stats[-1][1] < int(keep.sum()) + 2 * 10  # prompts once, paths shared
    assert (ours[0] - theirs[0])[keep].abs().max() <= 1e-5
    assert (ours[1] - theirs[1])[keep].abs().max() <= 1e-5
    for a, b in zip(ours[2], theirs[2]):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)
    assert max(float(g.abs().max()) for g in theirs[2]) > 1e-3  # the gradients compared are not all ~0


@pytest.mark.parametrize("where", ["config", "generation_kwargs"])
def test_repetition_penalty_as_trl_generation_applies_it(tmp_path, where):
    from transformers import RepetitionPenaltyLogitsProcessor

    penalty = {"repetition_penalty": 3.0} if where == "config" else {"generation_kwargs": {"repetition_penalty": 3.0}}
    rollout = rollout_func("tree", tree=TreeRollout(segment_len=3, branch_factor=2, first_split=2), seed=5)
    # a temperature this low samples the argmax of the penalised logits: the draws show which logits were used
    trainer = make_trainer(tmp_path, rollout, temperature=1e-3, **penalty)
    with torch.no_grad():
        trainer.model.lm_head.weight[1] = 0.0  # EOS rarely first: the low-temperature paths repeat tokens
    out = rollout(["1+2="] * WIDTH + ["say 42"] * WIDTH, trainer)
    process = RepetitionPenaltyLogitsProcessor(3.0)  # what transformers' generate (TRL's generation) applies
    followed = changed = 0
    for prompt, completion in zip(out["prompt_ids"], out["completion_ids"]):
        ids = torch.tensor([prompt + completion])
        with torch.no_grad():
            logits = trainer.model(input_ids=ids).logits[0, len(prompt) - 1:-1]
        for t, token in enumerate(completion):
            penalised = process(ids[:, :len(prompt) + t], logits[t:t + 1].clone())[0]
            top2 = penalised.topk(2).values
            if top2[0] - top2[1] > 1e-2:  # near-ties may go either way
                followed += token == int(penalised.argmax())
                changed += int(penalised.argmax()) != int(logits[t].argmax())
            else:
                followed += 1
    assert followed == sum(len(c) for c in out["completion_ids"])
    assert changed >= 3  # the penalty moved the argmax somewhere: the check above saw it applied
    rollout = rollout_func("tree", tree=TreeRollout(segment_len=3, branch_factor=2, first_split=2), seed=5)
    warm = make_trainer(tmp_path, rollout, **penalty)  # logprobs stay the raw model's, as TRL recomputes them
    ours, theirs, mask = trl_logprobs(warm, rollout(["1+2="] * WIDTH, warm))
    assert (ours - theirs)[mask].abs().max() <= 1e-4


def test_generation_kwargs_mapped_or_refused(tmp_path):
    rollout = rollout_func("independent")
    trainer = make_trainer(tmp_path, rollout, generation_kwargs={"top_k": 5, "do_sample": True, "temperature": 0.9})
    assert rollout.params(trainer, 0)["top_k"] == 5
    for bad, match in [({"num_beams": 2}, "num_beams"), ({"do_sample": False}, "do_sample"),
                       ({"temperature": 0.5}, "temperature")]:
        trainer.args.generation_kwargs = bad
        with pytest.raises(ValueError, match=match):
            rollout.params(trainer, 0)
