"""A trained draft head (EAGLE-style) for speculative decoding on the target's own features: the
module, and loading a saved one (training lives in ``decodekit.training.draft_head``).

The head is one decoder layer on top of the target: it reads the target's last hidden state
(after the final norm, what the LM head sees) at position t together with the embedding of
token t + 1, and predicts the hidden state at t + 1; the target's own LM head rows, restricted to
the ``vocab`` most frequent tokens of its outputs, turn that into a draft token. Chained, it drafts
k tokens for a few percent of a target step each (one small layer and an 8k-row head instead of
30 layers and the 49k-row head); its own K/V per sequence holds only entries built from verified
tokens and target features (``HeadDrafter`` in ``decodekit.drafting.drafters``).

Training (``decodekit draft-head``): the target answers prompts (greedy and sampled), a
teacher-forced pass records its hidden states and argmax tokens, and the head fits
cross-entropy on the target's argmax plus a smooth-L1 pull towards the target's hidden state on
the answers' positions, over ``passes`` unrolled draft steps: later steps read the head's own
predicted features with exactly the keys they see when drafting (EAGLE-3's training-time test).
The head is saved under ``~/.cache/decodekit/draft_heads/<model>/`` (weights and recipe); the
target's embedding and LM head are not stored, they are read from the target at load.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class HeadShape:
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    eps: float
    rope_theta: float

    @classmethod
    def of(cls, config) -> HeadShape:
        if getattr(config, "model_type", None) not in ("llama", "mistral", "qwen2", "qwen3"):
            raise ValueError(f"a draft head needs a Llama-style target (rotary, RMSNorm, SwiGLU); "
                             f"got model_type {getattr(config, 'model_type', None)!r}")
        rope = getattr(config, "rope_parameters", None) or {}
        theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        heads = config.num_attention_heads
        return cls(hidden=config.hidden_size, heads=heads, kv_heads=config.num_key_value_heads,
                   head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
                   intermediate=config.intermediate_size, eps=float(config.rms_norm_eps), rope_theta=float(theta))


class DraftHead(nn.Module):
    """fc([embed(token); feature]) -> one pre-norm decoder layer -> predicted next feature."""

    def __init__(self, shape: HeadShape, vocab_ids: torch.Tensor):
        super().__init__()
        h, d = shape.hidden, shape.head_dim
        self.shape = shape
        self.fc = nn.Linear(2 * h, h)
        self.attn_norm = nn.RMSNorm(h, eps=shape.eps)
        self.q = nn.Linear(h, shape.heads * d, bias=False)
        self.k = nn.Linear(h, shape.kv_heads * d, bias=False)
        self.v = nn.Linear(h, shape.kv_heads * d, bias=False)
        self.o = nn.Linear(shape.heads * d, h, bias=False)
        self.mlp_norm = nn.RMSNorm(h, eps=shape.eps)
        self.gate = nn.Linear(h, shape.intermediate, bias=False)
        self.up = nn.Linear(h, shape.intermediate, bias=False)
        self.down = nn.Linear(shape.intermediate, h, bias=False)
        self.register_buffer("vocab_ids", vocab_ids.long().clone())
        inv = 1.0 / (shape.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
        self.register_buffer("inv_freq", inv, persistent=False)
        self.embed: torch.Tensor | None = None  # (V, h) the target's input embeddings, bound at load
        self.lm_rows: torch.Tensor | None = None  # (V', h) the target's LM head rows for vocab_ids

    def bind(self, target_model) -> DraftHead:
        """Read the target's embedding table and LM head rows (not copied into the head's file)."""
        self.embed = target_model.get_input_embeddings().weight.detach()
        self.lm_rows = target_model.get_output_embeddings().weight.detach()[self.vocab_ids].contiguous()
        return self

    def init_from(self, layer) -> None:
        """Start from a target decoder layer's weights, with fc passing the feature through."""
        with torch.no_grad():
            pairs = [(self.q, layer.self_attn.q_proj), (self.k, layer.self_attn.k_proj),
                     (self.v, layer.self_attn.v_proj), (self.o, layer.self_attn.o_proj),
                     (self.gate, layer.mlp.gate_proj), (self.up, layer.mlp.up_proj), (self.down, layer.mlp.down_proj),
                     (self.attn_norm, layer.input_layernorm), (self.mlp_norm, layer.post_attention_layernorm)]
            for mine, theirs in pairs:
                mine.weight.copy_(theirs.weight)
            h = self.shape.hidden
            self.fc.weight.zero_()
            self.fc.weight[:, h:].copy_(torch.eye(h))
            self.fc.weight[:, :h].normal_(std=0.02)
            self.fc.bias.zero_()

    def forward(self, tokens: torch.Tensor, features: torch.Tensor, positions: torch.Tensor,
                past: tuple[torch.Tensor, torch.Tensor] | None = None):
        """(B, T) tokens, (B, T, h) features at the previous positions, (T,) positions.

        Returns the predicted features (B, T, h) and the layer's K/V (B, kv_heads, past + T, d).
        """
        x, q, k, v = self.project(tokens, features, positions)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        t = tokens.shape[1]
        mask = None
        if t > 1:  # causal within this call; every query sees all earlier (past) keys
            total = k.shape[2]
            mask = torch.ones(t, total, dtype=torch.bool, device=tokens.device).tril(total - t)
        return self.attend(x, q, k, v, mask), (k, v)

    def project(self, tokens, features, positions):
        """The layer input x and its rotated queries / keys and values, (B, heads, T, d)."""
        s = self.shape
        b, t = tokens.shape
        x = self.fc(torch.cat([F.embedding(tokens, self.embed), features], dim=-1))
        y = self.attn_norm(x)
        q = self.q(y).view(b, t, s.heads, s.head_dim).transpose(1, 2)
        k = self.k(y).view(b, t, s.kv_heads, s.head_dim).transpose(1, 2)
        v = self.v(y).view(b, t, s.kv_heads, s.head_dim).transpose(1, 2)
        cos, sin = self._rotary(positions)
        return x, _rotate(q, cos, sin).to(v.dtype), _rotate(k, cos, sin).to(v.dtype), v

    def attend(self, x, q, k, v, mask):
        """Attention over (k, v) under ``mask`` (True = may attend), then the MLP: predicted features."""
        s = self.shape
        b, _, t, _ = q.shape
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=s.kv_heads != s.heads)
        x = x + self.o(attn.transpose(1, 2).reshape(b, t, s.heads * s.head_dim))
        y = self.mlp_norm(x)
        return x + self.down(F.silu(self.gate(y)) * self.up(y))

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """Draft logits over the head's vocabulary (``vocab_ids``), (..., V')."""
        return features @ self.lm_rows.T

    def _rotary(self, positions: torch.Tensor):
        angles = positions.float().unsqueeze(-1) * self.inv_freq  # (T, d/2)
        emb = torch.cat([angles, angles], dim=-1)
        return emb.cos(), emb.sin()


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


# ---- files ---------------------------------------------------------------------------------------

def head_path(model_name: str) -> Path:
    """Where the head of ``model_name`` (or of a backend of that name) lives."""
    from decodekit.models import cache_root, model_name_of

    return cache_root() / "draft_heads" / model_name_of(model_name).replace("/", "--")


def save_head(head: DraftHead, model_name: str, recipe: dict, path: str | Path | None = None) -> Path:
    from safetensors.torch import save_file

    path = Path(path) if path else head_path(model_name)
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(path / "head.safetensors"))
    (path / "recipe.json").write_text(json.dumps({"shape": asdict(head.shape), **recipe}, indent=1))
    return path


def load_head(target_backend, path: str | Path | None = None) -> DraftHead:
    """The saved head for ``target_backend``'s model, bound to its weights; ValueError if there is none."""
    from safetensors.torch import load_file

    model = getattr(target_backend, "model", None)
    if model is None:
        raise ValueError("draft='head' needs a transformers (HF) target backend")
    path = Path(path) if path else head_path(target_backend.name)
    weights = path / "head.safetensors"
    if not weights.exists():
        from decodekit.models import model_name_of

        name = model_name_of(target_backend.name)
        raise ValueError(f"no draft head for {name!r} at {path}: train one with `decodekit draft-head --model {name}`")
    shape = HeadShape.of(model.config)
    saved = json.loads((path / "recipe.json").read_text())["shape"]
    if saved != asdict(shape):
        raise ValueError(f"draft head at {path} was trained for another model shape ({saved}), not {asdict(shape)}")
    state = load_file(str(weights))
    head = DraftHead(shape, state["vocab_ids"])
    head.load_state_dict(state)
    return head.to(device=target_backend.device, dtype=model.dtype).eval().bind(model)


