"""``TreePOTrainer``: TRL's ``GRPOTrainer`` with TreePO's segment-level advantages.

TRL computes rewards after the rollout and centres them per group inside
``_generate_and_score_completions``; no extra field can carry another estimate through it. This
subclass keeps the rewards TRL computed (``_calculate_rewards``) and, after TRL built the batch,
replaces its ``advantages`` with ``advantages.tree_advantages`` over each prompt's completions, from the
``tree_path`` field the decodekit rollout function returns.
"""

from __future__ import annotations

import math

import torch

from decodekit.integrations.trl.packing import pack, packable, packed_logps
from decodekit.integrations.trl.rollout import TREE_PATH
from decodekit.rollout.advantages import NORMALIZE, tree_advantages

try:
    from trl import GRPOTrainer
except ImportError as err:  # pragma: no cover - exercised where trl is missing
    raise ImportError("decodekit.integrations.trl.trainer needs TRL: pip install 'decodekit[rl]'") from err


class TreePOTrainer(GRPOTrainer):
    """``GRPOTrainer(..., rollout_func=decodekit.integrations.trl.rollout_func("tree"))`` with TreePO advantages.

    ``tree_normalize``: ``tree_advantages``' normalisation ("global": divided by the prompt's reward std,
    "group": per subtree group, None). With independent samples (every path its own branch from the root)
    the advantages are GRPO's ``(r - mean) / std`` per prompt.
    ``pack``: the loss forward runs each prompt's completions packed into their prefix tree (``packing``: every
    shared token computed once, TRL's log-probabilities and gradients); falls back to TRL's per-row forward
    for inputs or models the packing does not cover (images, MoE aux losses, sliding windows, scaled heads).
    ``pack_stats``: tokens TRL's rows would compute vs the packed rows, per packed forward.
    """

    def __init__(self, *args, tree_normalize: str | None = "global", pack: bool = True, **kwargs):
        if tree_normalize not in NORMALIZE:
            raise ValueError(f"tree_normalize must be one of {NORMALIZE}, got {tree_normalize!r}")
        super().__init__(*args, **kwargs)
        if self.rollout_func is None:
            raise ValueError("TreePOTrainer needs rollout_func=decodekit.integrations.trl.rollout_func(...): "
                             "its completions carry the tree paths the advantages are computed from")
        self.tree_normalize, self.pack = tree_normalize, pack
        self._rewards_per_func: torch.Tensor | None = None
        self.pack_stats: list[tuple[int, int]] = []

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                           compute_entropy=False, compute_aux_loss=False, **extra):
        unwrapped = self.accelerator.unwrap_model(model)
        if (not self.pack or compute_aux_loss or any(v is not None for v in extra.values())
                or not packable(unwrapped)):
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, batch_size=batch_size,
                compute_entropy=compute_entropy, compute_aux_loss=compute_aux_loss, **extra)
        packed = pack(input_ids, attention_mask, logits_to_keep)
        self.pack_stats.append((input_ids.numel(), packed.num_tokens))
        outputs = ("log_probs", "entropy") if compute_entropy else ("log_probs",)
        with self.accelerator.autocast():
            logps, entropy = packed_logps(unwrapped, packed, self.temperature, outputs)
        return logps, entropy, None

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        self._rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        return self._rewards_per_func

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        paths = [x.get(TREE_PATH) for x in inputs]
        if any(p is None for p in paths):
            raise ValueError(f"completions without {TREE_PATH!r}: TreePOTrainer needs the decodekit rollout_func")
        weights = self.reward_weights.to(self._rewards_per_func.device).unsqueeze(0)
        rewards = (self._rewards_per_func * weights).nansum(dim=1)
        rewards[torch.isnan(self._rewards_per_func).all(dim=1)] = torch.nan
        width = self.num_generations if self.model.training else self.num_generations_eval
        advantages = grouped_tree_advantages(paths, rewards.tolist(), width, normalize=self.tree_normalize)
        old = output["advantages"]
        output["advantages"] = torch.tensor(advantages, dtype=old.dtype, device=old.device)
        logged = self._logs["advantages"]  # TRL logged its group-centred ones: log these instead
        for _ in range(min(len(advantages), len(logged))):
            logged.pop()
        logged.extend(advantages)
        return output


def grouped_tree_advantages(paths: list, rewards: list[float], width: int, *,
                            normalize: str | None = "global") -> list[float]:
    """``tree_advantages`` per block of ``width`` consecutive completions (one prompt's group); a NaN
    reward (unscorable: every reward function returned None) is left out of its group and gets 0."""
    if len(paths) != len(rewards) or len(rewards) % width:
        raise ValueError(f"{len(paths)} paths and {len(rewards)} rewards do not form groups of {width}")
    out = [0.0] * len(rewards)
    for start in range(0, len(rewards), width):
        rows = [i for i in range(start, start + width) if not math.isnan(rewards[i])]
        if not rows:
            continue
        adv = tree_advantages([paths[i] for i in rows], [rewards[i] for i in rows], normalize=normalize)
        for i, a in zip(rows, adv):
            out[i] = a
    return out
