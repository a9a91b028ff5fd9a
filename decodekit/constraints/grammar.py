"""Grammar: a Lark context-free grammar (LALR), checked incrementally on prefixes.

A prefix is valid when its complete tokens are accepted by the LALR parser and the rest (the
last, possibly unfinished token, or an unlexable tail) is a prefix of a terminal the parser
accepts next. Parser states are memoised by token sequence, so a check after a known prefix
feeds only the new tokens (the interactive parser is copied, never re-run from the start).
"""

from __future__ import annotations

from collections import OrderedDict

import regex as re

from decodekit.constraints.base import Constraint
from decodekit.constraints.regex import CHECK_TIMEOUT, TimedPattern

_MEMO = 50_000
TERMINAL = "a grammar terminal"


class Grammar(Constraint):
    """``Grammar(lark_text, start="start")``: the output parses under the grammar.

    The grammar must be LALR(1) with Lark's basic lexer; ``ValueError`` otherwise. Terminals are
    matched with the ``regex`` module under ``timeout`` seconds per match (a terminal such as
    ``/(a|a)+b/`` backtracks exponentially): past it a check raises ``ConstraintTimeout``.

    ``engine="auto"``: llguidance masks generation where it compiles the grammar with no warning (its
    Lark dialect; its lexer is lazy where Lark's basic lexer is greedy, so where they differ the mask
    may allow text Lark refuses: the final Lark parse still decides EOS); ``"checker"``: checks only.
    """

    name = "grammar"

    def __init__(self, lark_text: str, *, start: str = "start", timeout: float | None = CHECK_TIMEOUT,
                 engine: str = "auto"):
        super().__init__()
        import lark

        from decodekit.constraints.guidance import check_engine, lark_grammar
        from decodekit.constraints.regex import mask_engine

        engine = check_engine(engine)
        if engine == "outlines":
            raise ValueError("outlines-core has no grammar engine: engine 'auto', 'llguidance' or 'checker'")

        if not isinstance(lark_text, str) or not lark_text.strip():
            raise ValueError("lark_text must be a non-empty Lark grammar string")
        self.lark_text = lark_text
        try:
            self._lark = lark.Lark(lark_text, parser="lalr", lexer="basic", start=start, regex=True)
        except Exception as e:  # lark's GrammarError, ConfigurationError, ...
            raise ValueError(f"grammar does not compile (LALR, basic lexer): {e}") from None
        self.timeout = timeout
        self._lexer = self._lark._build_lexer()  # Lark.lex would rebuild it on every call
        scanner = self._lexer.scanner
        scanner._mres = [TimedPattern(m, timeout, TERMINAL) for m in scanner._mres]
        self._errors = (lark.exceptions.UnexpectedInput, lark.exceptions.LarkError)
        self._terminals = {t.name: TimedPattern(re.compile(t.pattern.to_regexp()), timeout, TERMINAL)
                           for t in self._lark.terminals}
        self._parsers: OrderedDict[tuple, object] = OrderedDict()
        self._complete: OrderedDict[str, bool] = OrderedDict()
        self._accepts: OrderedDict[tuple, frozenset] = OrderedDict()
        source = lark_text if start == "start" else f"start: {start}\n{lark_text}"
        self.engine, self._grammar, self.engine_error = mask_engine(engine, lark_grammar, source)

    def mask_grammar(self) -> str | None:
        return self._grammar if self.engine == "llguidance" else None

    def prefix_ok_text(self, text: str) -> bool:
        tokens, stop = self._lex(text)
        if tokens:  # the last token may still grow ("12" -> "12.5", "SEL" -> "SELECT")
            if self._tail_ok(tokens[:-1], text[tokens[-1].start_pos :]):
                return True
        return self._tail_ok(tokens, text[stop:])

    def complete_ok_text(self, text: str) -> bool:
        if text not in self._complete:
            _remember(self._complete, text, self._parses(text))
        return self._complete[text]

    def _parses(self, text: str) -> bool:
        """The whole text lexes (with the timed lexer) and the tokens parse to the end."""
        tokens, stop = self._lex(text)
        if stop != len(text):
            return False
        parser = self._parser(tuple((t.type, str(t)) for t in tokens), tokens)
        if parser is None:
            return False
        try:
            parser.copy().feed_eof()
        except self._errors:
            return False
        return True

    def _lex(self, text: str) -> tuple[list, int]:
        """Tokens lexed before the first lexing error, and where lexing stopped."""
        tokens = []
        try:
            from lark.lexer import LexerThread

            for token in LexerThread.from_text(self._lexer, text).lex(None):
                tokens.append(token)
        except self._errors as e:
            return tokens, getattr(e, "pos_in_stream", len(text))
        return tokens, len(text)

    def _tail_ok(self, tokens: list, tail: str) -> bool:
        key = tuple((t.type, str(t)) for t in tokens)
        parser = self._parser(key, tokens)
        if parser is None:
            return False
        if not tail:
            return True
        if key not in self._accepts:  # accepts() tries every terminal: memoise it per state
            _remember(self._accepts, key, frozenset(parser.accepts()))
        return any(name in self._terminals and self._terminals[name].fullmatch(tail, partial=True)
                   for name in self._accepts[key])

    def _parser(self, key: tuple, tokens: list):
        """The interactive parser after ``tokens`` (None if they do not parse), from the longest memo."""
        cut = len(key)
        while cut > 0 and key[:cut] not in self._parsers:
            cut -= 1
        parser = self._parsers.get(key[:cut]) if cut else self._lark.parse_interactive()
        for i in range(cut, len(key)):
            if parser is None:
                break
            parser = parser.copy()
            try:
                parser.feed_token(tokens[i])
            except self._errors:
                parser = None
            _remember(self._parsers, key[: i + 1], parser)
        return parser


def _remember(memo: OrderedDict, key, value) -> None:
    memo[key] = value
    if len(memo) > _MEMO:
        memo.popitem(last=False)
