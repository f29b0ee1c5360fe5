"""The loss terms of a training step: one registry that the step, the metrics line and the progress
bar all read.

Each term is a *sum* over its valid items (positions, images or samples) divided by the step's
global count of those items (all micro-batches, all ranks); the total loss is
``sum_t weight_t * mean_t``. ``DistillStudent.forward`` returns ``{term.sum_key: sum}`` and
``batch_counts`` a vector of counts, both in ``TERMS`` order.

| term             | items                                 | weight (``LossWeights`` field) |
|------------------|---------------------------------------|--------------------------------|
| ce               | response tokens                       | 1                              |
| mdist_response   | response positions with teacher ids   | alpha                          |
| mdist_visual     | visual positions with teacher ids     | beta                           |
| mdist_prompt     | prompt positions with teacher ids     | delta                          |
| rdist            | images (relation matrices)            | gamma                          |
| hidden           | positions with teacher hidden states  | hidden                         |
| affinity         | samples with visual and response      | affinity                       |
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LossTerm:
    name: str  # the metric name (metrics.jsonl, progress bar, trackers)
    weight: str | None  # the LossWeights field that scales it; None: weight 1
    kind: str | None = None  # the position kind of an MDist term

    @property
    def sum_key(self) -> str:
        return f"{self.name}_sum"


TERMS: tuple[LossTerm, ...] = (
    LossTerm("ce", None),
    LossTerm("mdist_response", "alpha", "response"),
    LossTerm("mdist_visual", "beta", "visual"),
    LossTerm("mdist_prompt", "delta", "prompt"),
    LossTerm("rdist", "gamma"),
    LossTerm("hidden", "hidden"),
    LossTerm("affinity", "affinity"),
)
TERM_NAMES = tuple(t.name for t in TERMS)
SUM_KEYS = tuple(t.sum_key for t in TERMS)


def mdist_term(kind: str) -> LossTerm:
    """The MDist term of one position kind."""
    for t in TERMS:
        if t.kind == kind:
            return t
    raise KeyError(f"no MDist term for position kind {kind!r}")


@dataclass(frozen=True)
class LossWeights:
    """Weights of the terms after CE (CE weighs 1)."""

    alpha: float = 1.0  # MDist, response positions
    beta: float = 1.0  # MDist, visual positions
    gamma: float = 1.0  # RDist
    delta: float = 1.0  # MDist, prompt positions
    hidden: float = 0.0  # LLaVADI hidden-state alignment
    affinity: float = 0.0  # LLaVADI affinity

    def of(self, term: LossTerm) -> float:
        return 1.0 if term.weight is None else float(getattr(self, term.weight))

    def vector(self) -> list[float]:
        """Weights in ``TERMS`` order."""
        return [self.of(t) for t in TERMS]
