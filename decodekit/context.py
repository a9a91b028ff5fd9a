"""What a strategy sees of the engine: ``Lane`` records and the per-step ``StepContext``.

A *lane* is any KV handle a sequence uses beside its main one: an SMC particle, a tree leaf, a
draft model's cache, the other model of an entropy switch. Strategies hold ``Lane`` objects, never
KV handles, and ask the context to fork, open, truncate or close them; the engine owns every lane:
it releases all of a sequence's lanes when the sequence finishes, is aborted or is preempted (a
preempted strategy finds its lanes closed and reopens them through the prefix cache), so a strategy
needs no clean-up code to be correct.

Two kinds of lanes, by what their tokens are:

- a *mirror* follows the sequence's verified tokens (a draft model's or the other model's cache):
  when the engine releases it, the tokens it shares with the sequence enter that model's prefix cache;
- a *branch* has tokens of its own (a particle, a tree leaf): released without committing, unless
  the strategy closes it with ``commit=<its token ids>``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from decodekit.engine import Engine
    from decodekit.profiles import SpeculationProfile
    from decodekit.sequence import Sequence
    from decodekit.strategies.base import Row


class Lane:
    """One KV lane of a sequence on ``backend``; ``len(lane)`` tokens computed. Closed lanes have length 0."""

    __slots__ = ("backend", "handle", "mirror")

    def __init__(self, backend, handle, mirror: bool):
        self.backend = backend
        self.handle = handle
        self.mirror = mirror

    def __len__(self) -> int:
        return len(self.handle) if self.handle is not None else 0

    @property
    def closed(self) -> bool:
        """True once released (by ``close_lane``, or by the engine on finish / abort / preemption)."""
        return self.handle is None


class StepContext:
    """The engine as a strategy sees it: lanes, rows, work beside the forward, finishing, and read-only
    facts about the step.

    One context per engine; ``batch_size`` and ``num_waiting`` describe the step being planned."""

    def __init__(self, engine: Engine):
        self._engine = engine

    # ---- facts ------------------------------------------------------------------------------
    @property
    def backend(self):
        """The engine's model (read its name, vocabulary, context; its KV belongs to the engine)."""
        return self._engine.backend

    @property
    def tokenizer(self):
        return self._engine.tokenizer

    @property
    def vocab_size(self) -> int:
        return self._engine.backend.vocab_size

    @property
    def max_context(self) -> int:
        return self._engine.backend.max_context

    @property
    def batch_size(self) -> int:
        """Rows sharing this step's forward (every running sequence, whatever its strategy)."""
        return self._engine.step_batch

    @property
    def num_waiting(self) -> int:
        """Requests queued behind the running ones (finishing sooner admits them sooner)."""
        return len(self._engine.scheduler.waiting)

    @property
    def engine_key(self) -> int:
        """A key per engine, for strategies that keep per-engine state (one instance may serve several)."""
        return id(self._engine)

    def profile(self) -> SpeculationProfile:
        """The measured speculation profile of the engine's model and device."""
        from decodekit.profiles import profile_for

        return profile_for(self._engine.backend)

    # ---- lanes ------------------------------------------------------------------------------
    def fork_lane(self, seq: Sequence, source: Lane | None = None) -> Lane:
        """A branch lane sharing every computed token of ``source`` (default: the sequence's main KV)."""
        return self._engine.lanes.fork(seq, source)

    def open_lane(self, seq: Sequence, ids: list[int], backend=None, *, mirror: bool = True) -> Lane:
        """A lane on ``backend`` (default: the engine's model) holding the longest cached prefix of ``ids``."""
        return self._engine.lanes.open(seq, ids, backend, mirror=mirror)

    def truncate_lane(self, seq: Sequence, lane: Lane | None, n: int) -> None:
        """Roll ``lane`` (None: the main KV) back to its first ``n`` tokens (rejected drafts)."""
        self._engine.lanes.truncate(seq, lane, n)

    def commit_lane(self, seq: Sequence, lane: Lane) -> None:
        """Enter a mirror lane's verified tokens into its model's prefix cache now (other requests reuse them)."""
        self._engine.lanes.commit(seq, lane)

    def close_lane(self, seq: Sequence, lane: Lane, commit: list[int] | None = None) -> None:
        """Done with ``lane`` now (a dead particle, a finished leaf): its KV is released at once;
        ``commit``: the lane's token ids, entered into the prefix cache first."""
        self._engine.lanes.close(seq, lane, commit)

    def uncomputed(self, seq: Sequence, lane: Lane | None = None, ids: list[int] | None = None) -> list[int]:
        """``ids`` (default ``seq.ids``) the lane (default: main) lacks, at least the last one (rolled
        back if all are cached), so a row over them yields the next-token logits."""
        return self._engine.lanes.uncomputed(seq, lane, seq.ids if ids is None else ids)

    def features_at(self, seq: Sequence, start: int, stop: int):
        """(stop - start, H) final hidden states of the main KV's positions [start, stop), or None
        (the engine's model captures them for draft heads: ``Backend.capture_features``)."""
        return self._engine.backend.features_at(seq.handle, start, stop)

    def first_featured(self, seq: Sequence, stop: int) -> int | None:
        """The smallest p with hidden states for every main-KV position in [p, stop), or None."""
        return self._engine.backend.first_featured(seq.handle, stop)

    # ---- rows and requests ------------------------------------------------------------------
    def plan_row(self, seq: Sequence, new_ids: list[int], num_logits: int = 1, *, lane: Lane | None = None,
                 key: Any = None) -> Row:
        """A row of this step's forward: ``new_ids`` appended to ``lane`` (default: the main KV)."""
        from decodekit.strategies.base import Row

        return Row(seq, new_ids, num_logits, lane=lane, key=key)

    def forward_lanes(self, seq_lanes: list[tuple[Sequence, Lane]], new_ids: list[list[int]], num_logits=1):
        """A forward of its own over lanes of one backend (a draft model drafting), outside the step's."""
        return self._engine.lanes.forward(seq_lanes, new_ids, num_logits)

    def forward(self, seqs: list[Sequence], new_ids: list[list[int]], num_logits=1):
        """A main-model forward of its own over ``seqs``' main KV (one-call ``Strategy.step``)."""
        return self._engine.forward(seqs, new_ids, num_logits)

    def beside_forward(self, task) -> None:
        """Run ``task()`` on a worker thread while this step's forward runs (planned from ``plan``); the
        engine waits for it before any ``update``. For CPU work the next draw needs and the forward does
        not (a constraint's next masks: llguidance computes them with the GIL released). A task only
        fills caches the strategy would otherwise fill in ``update``: the engine may also skip it
        (``Engine.overlap``: off by default where the forward uses every CPU core), and a task that raises
        leaves them unfilled (``update`` computes them, meeting the error where it is isolated to the
        strategy's requests)."""
        self._engine.beside.append(task)

    def finish(self, seq: Sequence, reason: str) -> None:
        """End ``seq`` now with ``reason`` (e.g. "constraint_failed"); the engine releases its lanes."""
        self._engine.finish(seq, reason)
