"""Incremental detokenization and stop-string handling for one sequence."""

from __future__ import annotations


class TextState:
    """Tracks a sequence's output text, finds stop strings and yields safe-to-stream deltas."""

    def __init__(self, tokenizer, stop: tuple[str, ...]):
        self.tokenizer = tokenizer
        self.stop = stop
        self.text = ""
        self.sent = 0

    def update(self, output_ids: list[int]) -> bool:
        """Re-decode the output; returns True when a stop string appeared (text is cut before it)."""
        self.text = self.tokenizer.decode(output_ids)
        if not self.stop:
            return False
        window = max(len(s) for s in self.stop) + 16
        search_from = max(0, self.sent - window)
        cuts = [i for s in self.stop if (i := self.text.find(s, search_from)) >= 0]
        if cuts:
            self.text = self.text[: min(cuts)]
            return True
        return False

    def delta(self, final: bool) -> str:
        """Text not yet streamed, holding back an incomplete character or a possible stop-string start."""
        end = len(self.text)
        if not final:
            while end > self.sent and self.text[end - 1] == "\ufffd":
                end -= 1
            end -= self._stop_prefix_len(self.text[:end])
        if end <= self.sent:
            return ""
        piece = self.text[self.sent : end]
        self.sent = end
        return piece

    def _stop_prefix_len(self, text: str) -> int:
        best = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:k]):
                    best = max(best, k)
                    break
        return best
