"""A thin tokenizer wrapper: BOS handling, chat templates, token strings and token bytes."""

from __future__ import annotations

import re


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

    def apply_chat_template(self, messages: list[dict], special_in_content: bool = False) -> list[int]:
        """Token ids of ``messages`` with the generation prompt; a plain fallback without a template.

        A special token's text typed in a message (``<|im_end|>``) stays text, as in the OpenAI API,
        so a message cannot close its own turn; ``special_in_content=True`` lets it be the token."""
        if special_in_content or not any(self._has_special(m["content"]) for m in messages):
            return self._with_bos(self.hf(self._render(messages), add_special_tokens=False).input_ids)
        # render with a marker per message, then encode the contents with special-token text split
        marks = [f"\ue000{i}\ue001" for i in range(len(messages))]
        pieces = re.split("(\ue000\\d+\ue001)", self._render([{**m, "content": k} for m, k in zip(messages, marks)]))
        ids = []
        for piece in pieces:
            if piece in marks:
                content = messages[marks.index(piece)]["content"]
                ids += self.hf(content, add_special_tokens=False, split_special_tokens=True).input_ids
            elif piece:
                ids += self.hf(piece, add_special_tokens=False).input_ids
        return self._with_bos(ids)

    def _render(self, messages: list[dict]) -> str:
        if self.has_chat_template:
            return self.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"

    def _has_special(self, text: str) -> bool:
        return any(t in text for t in self.hf.all_special_tokens if t)

    def _with_bos(self, ids: list[int]) -> list[int]:
        if self.prepend_bos and (not ids or ids[0] != self.bos_token_id):
            return [self.bos_token_id, *ids]
        return list(ids)
