"""When fine-tuning stops, and why: the plateau rule on the validation split.

A validation *improves* when its top-1 beats the best so far by at least ``min_delta`` (the first
validation always does). With ``patience`` P > 0 the run stops at the validation that makes P in
a row without an improvement; ``finetune.epochs`` is then the maximum budget. With P = 0 the rule
only watches, and the run trains for the whole budget. ``min_step`` (``finetune.plateau_min_epochs``
in updates) is a minimum budget: the rule counts validations from the first one all the same, but
stops no run before that update, so a run whose first validations are flat at its start (a best
at the first validation, then nothing) is not stopped before it has had the chance to leave it.
A run the rule stops at or after ``min_step`` stops at the same update as with no minimum.

Every finished run records why it stopped (:func:`stop_record`):

* ``plateau``: the rule stopped it before the budget;
* ``budget``: it used the whole budget, and the last validation was not an improvement (or there
  was no validation split);
* ``budget-still-improving``: it used the whole budget and its last validation was an improvement
  on an earlier one (at least the second validation, a new best by ``min_delta`` or more): the
  curve was still rising when the budget ran out, so a larger budget may give a better model.
  This one is logged as a warning.

The rule's state is a few numbers (:meth:`Plateau.state_dict`) that the fine-tuning checkpoint
carries, so a resumed run stops exactly where an uninterrupted one does.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

PLATEAU = "plateau"
BUDGET = "budget"
STILL_IMPROVING = "budget-still-improving"
STOP_REASONS = (PLATEAU, BUDGET, STILL_IMPROVING)

_EPS = 1e-9  # top-1 values are fractions k / n: a rise of exactly min_delta counts


@dataclass
class Plateau:
    """The plateau rule and its state: best validation top-1 (in the rule's sense: raised by at
    least ``min_delta`` each time), where it was reached, and validations since then."""

    patience: int
    min_delta: float
    min_step: int = 0           # no stop before this update
    best: float = -1.0
    best_step: int = -1
    since_best: int = 0         # validations in a row without an improvement
    validations: int = 0
    last_rise: float = 0.0      # how much the latest improvement raised the best
    stopped_at: int | None = None   # update at which the rule stopped the run

    def observe(self, step: int, top1: float) -> bool:
        """Record the validation at update ``step``; True when the run should stop there."""
        first = self.validations == 0
        self.validations += 1
        if first or (top1 > self.best and top1 - self.best >= self.min_delta - _EPS):
            self.last_rise = 0.0 if first else top1 - self.best
            self.best, self.best_step, self.since_best = top1, step, 0
        else:
            self.since_best += 1
        if 0 < self.patience <= self.since_best and step >= self.min_step:
            self.stopped_at = step
        return self.stopped

    @property
    def stopped(self) -> bool:
        return self.stopped_at is not None

    @property
    def still_improving(self) -> bool:
        """The latest validation improved on an earlier one by at least ``min_delta``."""
        return self.validations >= 2 and self.since_best == 0

    def state_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        state = {"min_step": 0, **state}       # states saved before the minimum had none
        rule = (state.get("patience"), state.get("min_delta"), state["min_step"])
        if rule != (self.patience, self.min_delta, self.min_step):
            raise ValueError(f"plateau state of patience {rule[0]}, min_delta {rule[1]}, "
                             f"min_step {rule[2]} does not fit this run's {self.patience}, "
                             f"{self.min_delta}, {self.min_step}")
        for f in dataclasses.fields(self):
            setattr(self, f.name, state[f.name])


def stop_record(plateau: Plateau, step: int, total: int, validated: bool) -> dict[str, Any]:
    """``stopped`` (one of :data:`STOP_REASONS`), ``stopped_step`` and ``stop_reason`` (one
    line) of a finished run at update ``step`` of a budget of ``total``."""
    p = plateau
    if p.stopped:
        reason = PLATEAU
        text = (f"plateau at update {step} of {total}: {_validations(p.since_best)} without "
                f"a rise of {p.min_delta:.1%} over the best top-1 {p.best:.1%} (update "
                f"{p.best_step})" + (f"; no stop before update {p.min_step}" if p.min_step else ""))
    elif not validated or p.validations == 0:
        reason = BUDGET
        text = f"budget: all {total} updates done (no validation split, no plateau rule)"
    elif p.still_improving:
        reason = STILL_IMPROVING
        text = (f"budget while still improving: all {total} updates done and the last "
                f"validation raised the best top-1 by {p.last_rise:.1%} to {p.best:.1%}; a "
                "larger finetune.epochs may give a better model")
    else:
        reason = BUDGET
        text = (f"budget: all {total} updates done; best top-1 {p.best:.1%} at update "
                f"{p.best_step}, then {_validations(p.since_best)} without a rise of "
                f"{p.min_delta:.1%}")
    return {"stopped": reason, "stopped_step": step, "stop_reason": text}


def _validations(n: int) -> str:
    return f"{n} validation" + ("" if n == 1 else "s")
