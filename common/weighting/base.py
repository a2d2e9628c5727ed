"""The weighting interface: what a strategy sees of each site, and what a strategy is (`WeightingStrategy`).

A strategy turns the sites' reports into the weights `w_i` of the merge. Most are a function of the reports
(`weigh`); `needs` names what each site must add to its report for it (a domain embedding for Chameleon, the
alignment of its vector with the target direction for DGA). A `search` strategy instead scores candidate merges on
the sites' validation splits (`common.weighting.search.search_merge`), and runs only where the privacy guard allows
more than one aggregation of the same vectors.

Like a mergekit merge method, a strategy owns its parameters (`parameters()`: name, type, default, range, help;
the run config takes its fields' defaults and help from them, so the CLI options and config keys stay where they
are) and its checks (`validate(cfg)`, called by `RunConfig.validate` for the chosen strategy).
"""

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from feddem.common.errors import FeddemError

EMBEDDING = "embedding"  # site report: mean middle-layer hidden state of the base model over its examples
ALIGNMENT = "alignment"  # site report: cosine of its vector with the target direction (DGA)


@dataclass
class SiteReport:
    site: str
    domain: str
    examples: int
    tokens: int
    train_loss: float = float("nan")
    extra: dict = field(default_factory=dict)  # EMBEDDING -> np.ndarray, ALIGNMENT -> float


WeighFn = Callable[[list[SiteReport], object, dict], list[float]]  # (reports, RunConfig, state across rounds)


@dataclass(frozen=True)
class Parameter:
    """One run-config option a strategy owns: `name` is its kebab-case key (`--NAME` on the command line), `low` and
    `high` bound numbers (`open_low`/`open_high`: the bound itself is excluded); strings and booleans have no
    range."""

    name: str
    type: type
    default: Any
    help: str
    low: float | None = None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False

    @property
    def attribute(self) -> str:
        """The RunConfig field that holds it."""
        return self.name.replace("-", "_")

    def range_text(self) -> str:
        if self.type is int and self.low is not None and self.high is None:
            return f"at least {self.low:g}"
        if self.low is not None and self.high is None:
            return "a positive number" if self.open_low and self.low == 0 else f"a number >= {self.low:g}"
        return (f"in {'(' if self.open_low else '['}{self.low:g}, {self.high:g}{')' if self.open_high else ']'}")

    def check(self, value) -> None:
        """A FeddemError naming the option when `value` is outside the range (nan and inf are always outside)."""
        if self.type not in (int, float) or (self.low is None and self.high is None):
            return
        low_ok = self.low is None or (value > self.low if self.open_low else value >= self.low)
        high_ok = self.high is None or (value < self.high if self.open_high else value <= self.high)
        if not (math.isfinite(value) and low_ok and high_ok):
            raise FeddemError(f"{self.name} must be {self.range_text()}, got {value}")


CheckFn = Callable[[object], None]  # (RunConfig) -> None, raising a FeddemError


@dataclass(frozen=True)
class WeightingStrategy:
    """A weighting strategy (not Flower's `Strategy`): its name and help, its weights from the sites' reports
    (`weigh`; None for a search strategy), what the sites must report (`needs`), its parameters and hooks."""

    name: str
    help: str
    weigh: WeighFn | None = None  # None: a search strategy
    needs: frozenset = frozenset()
    search: bool = False
    params: tuple[Parameter, ...] = ()
    check: CheckFn | None = None  # cross-option rules of this strategy (beyond its parameters' ranges)
    aggregations_per_merge: Callable[[object], int] | None = None  # aggregations of the same vectors it needs

    def parameters(self) -> tuple[Parameter, ...]:
        """The run-config options this strategy owns."""
        return self.params

    def check_parameters(self, cfg) -> None:
        """Each of its parameters' values in `cfg` within its declared range."""
        for p in self.params:
            p.check(getattr(cfg, p.attribute))

    def validate(self, cfg) -> None:
        """Everything this strategy needs of `cfg` (a RunConfig), when it is the chosen one."""
        self.check_parameters(cfg)
        if self.check is not None:
            self.check(cfg)

    def aggregations(self, cfg) -> int:
        """How many aggregations of the same vectors one merge with this strategy takes (1 but for a search)."""
        return self.aggregations_per_merge(cfg) if self.aggregations_per_merge is not None else 1


def normalised(values) -> list[float]:
    """Non-negative values scaled to sum to 1 (uniform when they sum to 0)."""
    v = np.asarray(values, dtype=np.float64)
    total = v.sum()
    return [float(x) for x in (v / total if total > 0 else np.full(len(v), 1.0 / len(v)))]


def softmax(values, temperature: float) -> list[float]:
    z = np.asarray(values, dtype=np.float64) / temperature
    z = np.exp(z - z.max())
    return [float(x) for x in z / z.sum()]
