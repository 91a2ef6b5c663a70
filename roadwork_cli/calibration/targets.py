"""What calibration must certify (``Targets``), the certification methods (one registry), and what it chose
(``CalibrationOutcome``, serialised into scrc_params.json).

Example:
    >>> targets = Targets(alpha=0.02, delta=0.1, xi=0.8)
    >>> create_method("scrc").high_probability
    True
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Protocol

from roadwork_cli.calibration.stats import check_delta_split
from roadwork_cli.errors import UsageError
from roadwork_cli.io.atomic import json_safe
from roadwork_cli.registry import Registry

OBJECTIVES = ("accuracy", "coverage", "mcc")


@dataclass(frozen=True)
class Targets:
    """What calibration must certify, and how to choose among certified thresholds.

    Raises:
        UsageError: delta1 = delta_coverage_share * delta > 1/2 (the one-sided DKW constant needs delta1 <= 1/2).
    """

    alpha: float
    delta: float
    xi: float
    delta_coverage_share: float = 0.5
    objective: str = "accuracy"

    def __post_init__(self) -> None:
        check_delta_split(self.delta, self.delta_coverage_share)
        if self.objective not in OBJECTIVES:
            raise UsageError(f"Unknown objective {self.objective!r}; choose one of {', '.join(OBJECTIVES)}.")

    @property
    def delta1(self) -> float:
        """Failure probability spent on the coverage bound."""
        return check_delta_split(self.delta, self.delta_coverage_share)[0]

    @property
    def delta2(self) -> float:
        """Failure probability spent on the risk tests."""
        return check_delta_split(self.delta, self.delta_coverage_share)[1]


@dataclass(frozen=True)
class Method:
    """A certification method: what it guarantees, and the rule it implies (None: the configured rule)."""

    name: str
    description: str
    high_probability: bool
    rule: str | None = None


METHODS: Registry[Method] = Registry("calibration method")
for _method in (
    Method("scrc", "SCRC-I: FNR on exits <= alpha and coverage >= xi with probability >= 1 - delta", True),
    Method("crc", "conformal risk control: FNR on exits <= alpha in expectation", False),
    Method("sets", "class-conditional conformal prediction sets (in expectation)", False, rule="sets"),
):
    METHODS.add(_method.name, _method, _method.description)


def list_methods() -> list[str]:
    """Names of the certification methods."""
    return METHODS.names()


def create_method(name: str) -> Method:
    """The method registered as ``name``.

    Raises:
        UnknownNameError: No such method.
    """
    return METHODS.get(name)


class DecisionRule(Protocol):
    """What an outcome needs of its rule (``rules.Rule`` implements it): decisions and the thresholds block."""

    def decide(self, p, g): ...

    def to_params(self) -> dict[str, Any]: ...


@dataclass
class CalibrationOutcome:
    """Chosen rule (with its thresholds) and everything needed to audit it (serialised into scrc_params.json)."""

    method: str
    feasible: bool
    rule: DecisionRule
    alpha: float
    delta: float
    xi: float
    n: int
    n_pos: int
    delta1: float = 0.0
    delta2: float = 0.0
    grid: list[float] = field(default_factory=list)
    coverage: float = float("nan")
    coverage_lower: float | None = None
    fnr: float = float("nan")
    fnr_upper_pointwise: float | None = None
    accuracy_on_exits: float = float("nan")
    exited_positives: int = 0
    misses: int = 0
    certified_pairs: int = 0
    attainable: dict[str, float | None] = field(default_factory=dict)
    per_grid: list[dict[str, Any]] = field(default_factory=list)
    note: str = ""
    unit: str = "images"  # what the guarantee counts as independent draws: "images" or "groups"
    n_groups: int | None = None  # with unit "groups": how many groups val_calib holds
    largest_group: int | None = None  # ... and the images in the largest one

    @property
    def thresholds(self) -> dict[str, Any]:
        """The rule's thresholds as written to scrc_params.json."""
        return self.rule.to_params()

    @property
    def certified(self) -> bool:
        """True when the targets hold with probability >= 1 - delta (a feasible high-probability method)."""
        return bool(self.feasible and create_method(self.method).high_probability)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict: NaN/inf become None (the grid's -inf is written as null = 'everything exits')."""
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "rule"}
        return json_safe({**data, "thresholds": self.thresholds, "certified": self.certified})


__all__ = [
    "METHODS",
    "OBJECTIVES",
    "CalibrationOutcome",
    "DecisionRule",
    "Method",
    "Targets",
    "create_method",
    "list_methods",
]
