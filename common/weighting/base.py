"""What a weighting strategy sees of each site: only the metadata the site reported."""

from dataclasses import dataclass, field
from typing import Callable


@dataclass
class SiteReport:
    site: str
    domain: str
    examples: int
    tokens: int
    train_loss: float = float("nan")
    extra: dict = field(default_factory=dict)


WeightingFn = Callable[[list[SiteReport]], list[float]]
