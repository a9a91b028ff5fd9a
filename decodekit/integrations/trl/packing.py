"""The policy's forward over a batch of completions packed into their prefix trees (each shared token once).

TRL's loss forward runs every completion as its own row: a group of ``num_generations`` completions of one
prompt computes the prompt ``num_generations`` times, and every prefix two tree paths share twice. Here
each distinct prompt and the completions under it become one packed row: a trie over the tokens, every node
attending to its ancestors (a 4D mask), at its depth as position (RoPE is shift invariant, so positions
from 0 give TRL's left-padded rows' attention). Each completion token's log-probability is read from its
parent node's hidden state through TRL's own chunked LM-head kernel; tokens shared by several
completions are the same tensor element in each, so autograd sums their gradients as TRL's separate rows
would. The result has TRL's ``(batch, logits_to_keep)`` layout, 0 at padded positions (masked in the loss).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# configs whose LM head scales its logits: TRL's fused head handles them; the packed path leaves them to it
LOGIT_SCALES = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier",
                "logits_scaling")
CHUNK = 32768  # TRL's _CHUNKED_LOGPROB_CHUNK_SIZE: the same tiles, the same numerics


@dataclass
class Packed:
    """One packed row per distinct prompt, and where each completion token's prediction sits in it."""

    ids: torch.Tensor  # (G, N) token ids, 0 past a row's nodes
    positions: torch.Tensor  # (G, N) node depths
    allowed: torch.Tensor  # (G, N, N) bool: query node attends key node (its ancestors and itself)
    pred_row: torch.Tensor  # (M,) packed row of each distinct prediction
    pred_pos: torch.Tensor  # (M,) node whose hidden state predicts it (the token's parent)
    labels: torch.Tensor  # (M,) the predicted token
    index: torch.Tensor  # (B, logits_to_keep) prediction per completion position, -1 where padded

    @property
    def num_tokens(self) -> int:
        return int((self.positions >= 0).sum())


class _Trie:
    """The nodes of one packed row: token, parent and depth per node, children by (parent, token)."""

    def __init__(self):
        self.tokens: list[int] = []
        self.parents: list[int] = []
        self.depths: list[int] = []
        self.children: dict[tuple[int, int], int] = {}

    def add(self, parent: int, token: int) -> int:
        key = (parent, token)
        if key not in self.children:
            self.children[key] = len(self.tokens)
            self.tokens.append(token)
            self.parents.append(parent)
            self.depths.append(self.depths[parent] + 1 if parent >= 0 else 0)
        return self.children[key]


def pack(input_ids: torch.Tensor, attention_mask: torch.Tensor, logits_to_keep: int) -> Packed:
    """Pack TRL's ``cat(prompt, completion)`` rows (left-padded prompts, right-padded completions)."""
    start = input_ids.size(1) - logits_to_keep
    tries: dict[tuple[int, ...], int] = {}
    forest: list[_Trie] = []
    preds: dict[tuple[int, int], int] = {}
    pred_rows, pred_pos, labels = [], [], []
    index = torch.full((input_ids.size(0), logits_to_keep), -1, dtype=torch.long)
    ids, mask = input_ids.tolist(), attention_mask.bool().tolist()
    for b, (row, keep) in enumerate(zip(ids, mask)):
        prompt = tuple(t for t, k in zip(row[:start], keep[:start]) if k)
        if not prompt:
            raise ValueError(f"row {b} has an empty prompt: nothing predicts its first completion token")
        g = tries.setdefault(prompt, len(forest))
        if g == len(forest):
            forest.append(_Trie())
        trie, node = forest[g], -1
        for token in prompt:
            node = trie.add(node, token)
        for t in range(logits_to_keep):
            if not keep[start + t]:
                break  # right padding: the completion ended
            parent, node = node, trie.add(node, row[start + t])
            key = (g, node)
            if key not in preds:
                preds[key] = len(labels)
                pred_rows.append(g)
                pred_pos.append(parent)
                labels.append(row[start + t])
            index[b, t] = preds[key]
    ids_t, pos_t, allowed = _rows(forest, input_ids.device)
    dev = input_ids.device
    return Packed(ids_t, pos_t, allowed, torch.tensor(pred_rows, device=dev), torch.tensor(pred_pos, device=dev),
                  torch.tensor(labels, device=dev), index.to(dev))


def _rows(forest: list[_Trie], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Padded ids, positions (-1 past a row's nodes) and ancestor masks of the packed rows."""
    width = max(len(t.tokens) for t in forest)
    ids = torch.zeros((len(forest), width), dtype=torch.long)
    positions = torch.full((len(forest), width), -1, dtype=torch.long)
    allowed = torch.zeros((len(forest), width, width), dtype=torch.bool)
    for g, trie in enumerate(forest):
        n = len(trie.tokens)
        ids[g, :n] = torch.tensor(trie.tokens)
        positions[g, :n] = torch.tensor(trie.depths)
        for j, parent in enumerate(trie.parents):  # parents precede children: their rows are complete
            if parent >= 0:
                allowed[g, j] = allowed[g, parent]
            allowed[g, j, j] = True
        allowed[g, range(n, width), range(n, width)] = True  # a padding query sees only itself (no empty row)
    return ids.to(device), positions.to(device), allowed.to(device)


def packable(model) -> bool:
    """Whether the packed path computes what TRL's would for ``model``: one 4D mask serves every layer (no sliding
    windows) and the LM head does not scale its logits."""
    config = model.config.get_text_config()
    full_only = set(getattr(config, "layer_types", None) or ["full_attention"]) == {"full_attention"}
    unscaled = all(getattr(config, name, None) is None for name in LOGIT_SCALES)
    return full_only and unscaled and hasattr(model, "base_model_prefix")


def packed_logps(model, packed: Packed, temperature: float, outputs: tuple[str, ...]):
    """Per-token log-probabilities (and entropies if ``outputs`` asks) in TRL's ``(B, logits_to_keep)`` layout."""
    from trl.kernels import ChunkedLogProbFunction

    backbone = getattr(model, model.base_model_prefix)
    hidden = backbone(input_ids=packed.ids, position_ids=packed.positions.clamp(min=0),
                      attention_mask=_mask_arg(model, packed.allowed), use_cache=False).last_hidden_state
    head = model.get_output_embeddings()
    rows = hidden[packed.pred_row, packed.pred_pos]  # (M, H): each distinct prediction once
    logps, entropy, *_ = ChunkedLogProbFunction.apply(rows, head.weight, head.bias, packed.labels, temperature,
                                                      CHUNK, None, 1.0, outputs)
    valid = packed.index >= 0
    at = packed.index.clamp(min=0)
    spread = [None if x is None else torch.where(valid, x[at], x.new_zeros(())) for x in (logps, entropy)]
    return spread[0], spread[1]


def _mask_arg(model, allowed: torch.Tensor):
    """The ancestor mask as the model takes it: transformers passes a 4D mask through as it is (additive for
    eager), to every layer, so models with sliding-window layers are refused."""
    mask = allowed.unsqueeze(1)  # (G, 1, N, N)
    if model.config._attn_implementation == "eager":
        dtype = next(model.parameters()).dtype
        mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
    return mask
