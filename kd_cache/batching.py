"""Which samples share a teacher forward: fixed-size batches in data order, or batches by token budget.

A forward is padded to its longest sample, so it costs ``len(batch) x longest`` tokens of compute and
activation memory. ``plan_batches`` with ``max_batch_tokens`` sorts each window of ``window``
consecutive samples by length and cuts the sorted run into batches whose padded size fits the budget:
neighbours in length share a forward, so little is padding, and every forward is at most the budget,
so peak activation memory no longer depends on the unluckiest batch.

Only the grouping changes. The build restores each shard's samples to data order after the forward,
and a window never crosses a shard (the build plans one shard at a time), so a shard holds the same
samples in the same order, whatever the budget, the window or the number of ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

# A batch is also cut where its next sample would make more than this share of its tokens padding: where
# many short samples fit the budget, their spread of lengths would otherwise pad the forward.
MAX_PADDING = 0.05


def plan_batches(lengths: list[int], *, batch_size: int, max_batch_tokens: int | None = None,
                 window: int = 128) -> list[list[int]]:
    """Indices into ``lengths`` (tokens per sample, after image expansion), one list per forward.

    Without ``max_batch_tokens``: ``batch_size`` samples at a time, in order. With it: each window of
    ``window`` consecutive samples sorted by length, longest first (ties in data order), cut greedily so
    that ``len(batch) x longest <= max_batch_tokens`` and at most ``MAX_PADDING`` of that is padding; a
    sample longer than the budget goes alone.
    ``batch_size`` is then not used. Deterministic: a pure function of the lengths and the settings.
    """
    n = len(lengths)
    if max_batch_tokens is None:
        return [list(range(a, min(a + batch_size, n))) for a in range(0, n, batch_size)]
    out: list[list[int]] = []
    for a in range(0, n, window):
        order = sorted(range(a, min(a + window, n)), key=lambda i: (-lengths[i], i))
        batch: list[int] = []
        real = 0
        for i in order:
            # Sorted longest first: the batch's first sample is its longest, its size n x lengths[batch[0]].
            size = (len(batch) + 1) * lengths[batch[0]] if batch else 0
            if batch and (size > max_batch_tokens or real + lengths[i] < (1 - MAX_PADDING) * size):
                out.append(batch)
                batch, real = [], 0
            batch.append(i)
            real += lengths[i]
        if batch:
            out.append(batch)
    return out


@dataclass
class Padding:
    """Tokens of the forwards of a plan: the samples' own (``real``) and as padded (``padded``)."""

    real: int = 0
    padded: int = 0
    forwards: int = 0
    largest: int = 0  # the largest forward's padded tokens (what peak activation memory follows)

    def add(self, lengths: list[int]) -> None:
        size = len(lengths) * max(lengths)
        self.real += sum(lengths)
        self.padded += size
        self.forwards += 1
        self.largest = max(self.largest, size)

    @property
    def fraction(self) -> float:
        """Share of the forwards' tokens that are padding."""
        return 1.0 - self.real / self.padded if self.padded else 0.0


def padding_of(lengths: list[int], plan: list[list[int]]) -> Padding:
    """The padding of running ``plan`` (``plan_batches``) over samples of ``lengths``."""
    pad = Padding()
    for batch in plan:
        pad.add([lengths[i] for i in batch])
    return pad
