"""The strategy registry: each strategy's name, options, how it takes a constraint, what it is on vLLM.

``api`` (``strategy="name"``, ``constraint=``), the CLI, the server (``decodekit.strategy``) and the
vLLM mapping read it; none of them switches on names. A new strategy is one file and one entry here.

``constraint`` says what ``constraint=`` does with a strategy:

- ``"wraps"``: it becomes the strategy named by ``constrained_as`` built around the constraint
  (plain sampling -> ``constrained``, speculative -> ``constrained_speculative``);
- ``"own"``: the strategy takes the constraint among its own options (``hint`` says where);
- ``"is"``: it is a constrained strategy already (give it the constraint, not both);
- ``"no"``: it does not enforce constraints.

``on_vllm`` names its form on the vLLM backend, "+"-joined where it needs several: ``native`` (plain
sampling), ``speculative_config`` (vLLM's engine-wide drafts), ``structured_outputs`` (vLLM's grammar
backends), ``segment_level`` (decodekit drives vLLM per segment: tree rollouts, entropy switching)
or ``none``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from decodekit.strategies.base import Strategy
from decodekit.strategies.best_of import BestOfN
from decodekit.strategies.constrained import Constrained
from decodekit.strategies.constrained_speculative import ConstrainedSpeculative
from decodekit.strategies.entropy import EntropySwitch
from decodekit.strategies.sample import Sample
from decodekit.strategies.speculative import Speculative
from decodekit.strategies.tree_strategy import TreeStrategy

# options of the constraint itself when a strategy is wrapped (the rest go to the wrapped strategy)
CONSTRAINED_OPTIONS = ("sampler", "num_particles", "ess_threshold", "resampling", "exact_weights")


@dataclass(frozen=True)
class Entry:
    name: str
    build: Callable[..., Strategy]
    constraint: str  # "wraps" | "own" | "is" | "no"
    on_vllm: str
    constrained_as: str | None = None
    hint: str = ""  # what to do instead, where a strategy does not take constraint=
    # presence / frequency / repetition penalties and logit_bias: every distribution it forms gets its history
    penalties: bool = False

    @property
    def vllm_forms(self) -> tuple[str, ...]:
        return tuple(self.on_vllm.split("+"))

    def wrap(self, constraint, options: dict) -> Strategy:
        """This strategy (built from ``options``) under ``constraint``: the constrained form, with the
        constraint's own options (``CONSTRAINED_OPTIONS``) given to the constraint."""
        if self.constraint != "wraps":
            raise ValueError(self.hint or f"strategy {self.name!r} does not take constraint=")
        own = {k: v for k, v in options.items() if k in CONSTRAINED_OPTIONS}
        inner = self.build(**{k: v for k, v in options.items() if k not in CONSTRAINED_OPTIONS})
        return WRAPPERS[self.constrained_as](constraint, inner, own)


def _constrained(constraint, inner, own) -> Strategy:
    return Constrained(constraint, **own)


def _constrained_speculative(constraint, inner, own) -> Strategy:
    return ConstrainedSpeculative(constraint, inner, **own)


WRAPPERS = {"constrained": _constrained, "constrained_speculative": _constrained_speculative}

ENTRIES = (
    Entry("sample", Sample, "wraps", "native", constrained_as="constrained", penalties=True),
    Entry("speculative", Speculative, "wraps", "speculative_config", constrained_as="constrained_speculative",
          penalties=True),
    Entry("constrained", Constrained, "is", "structured_outputs",
          hint="give either strategy=Constrained(...) or constraint=, not both", penalties=True),
    Entry("constrained_speculative", ConstrainedSpeculative, "is", "speculative_config+structured_outputs",
          hint="give either strategy=ConstrainedSpeculative(...) or constraint=, not both", penalties=True),
    Entry("entropy", EntropySwitch, "own", "segment_level",
          hint="EntropySwitch takes the constraint itself: EntropySwitch(..., constraint=C, sampler=...)",
          penalties=True),
    Entry("tree", TreeStrategy, "own", "segment_level",
          hint="tree rollouts take the constraint in TreeRollout(constraint=C)", penalties=True),
    Entry("best_of", BestOfN, "no", "none", hint="best_of does not enforce constraints"),
)
REGISTRY = {e.name: e for e in ENTRIES}


def entry(name: str) -> Entry:
    """The registry entry of ``name``; ``ValueError`` naming the known ones."""
    if name not in REGISTRY:
        raise ValueError(f"unknown strategy {name!r}; known: {sorted(REGISTRY)}")
    return REGISTRY[name]


def entry_of(strategy: Strategy | None) -> Entry:
    """The entry of a strategy instance (None: plain sampling); a strategy not registered counts as
    its own kind, taking no constraint and with no vLLM form."""
    if strategy is None:
        return REGISTRY["sample"]
    known = REGISTRY.get(strategy.name)
    if known is not None and isinstance(strategy, known.build):
        return known
    return Entry(strategy.name, type(strategy), "no", "none",
                 hint=f"strategy {strategy.name!r} does not take constraint=; give a Constrained(...) strategy alone")


def by_name(name: str, **options) -> Strategy:
    """A strategy from its registered name and options."""
    return entry(name).build(**options)


def with_constraint(constraint, strategy: Strategy | None, **own) -> Strategy:
    """``strategy`` (an instance or None) enforcing ``constraint``; ``own``: the constraint's options."""
    found = entry_of(strategy)
    if found.constraint != "wraps":
        raise ValueError(found.hint or f"strategy {found.name!r} does not take constraint=")
    return WRAPPERS[found.constrained_as](constraint, strategy, own)
