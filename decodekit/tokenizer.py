"""A thin tokenizer wrapper: BOS handling, chat templates, token strings and token bytes."""

from __future__ import annotations


class Tokenizer:
    """Wraps a Hugging Face tokenizer.

    ``prepend_bos`` fixes GGUF tokenizers that do not add a BOS the model was trained with
    (Gemma 3 on transformers 5.19/5.20: without it the model degenerates to "The The The").
    """

    def __init__(self, hf_tokenizer, prepend_bos: bool = False):
        self.hf = hf_tokenizer
        self.prepend_bos = prepend_bos and hf_tokenizer.bos_token_id is not None
        self.bos_token_id = hf_tokenizer.bos_token_id
        eos = hf_tokenizer.eos_token_id
        self.eos_token_ids = frozenset([eos] if isinstance(eos, int) else (eos or []))
        self.vocab_size = len(hf_tokenizer)

    def encode(self, text: str) -> list[int]:
        ids = self.hf(text, add_special_tokens=True).input_ids
        return self._with_bos(ids)

    def decode(self, ids) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=True)

    def token_str(self, token_id: int) -> str:
        return self.hf.decode([token_id], skip_special_tokens=False)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.hf, "chat_template", None))

    def apply_chat_template(self, messages: list[dict]) -> list[int]:
        """Token ids of ``messages`` with the generation prompt; a plain fallback without a template."""
        if self.has_chat_template:
            text = self.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        else:
            text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
        ids = self.hf(text, add_special_tokens=False).input_ids
        return self._with_bos(ids)

    def _with_bos(self, ids: list[int]) -> list[int]:
        if self.prepend_bos and (not ids or ids[0] != self.bos_token_id):
            return [self.bos_token_id, *ids]
        return list(ids)
