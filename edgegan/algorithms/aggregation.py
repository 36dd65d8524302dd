"""Aggregation rules over device state dicts, and the server-side optimiser applied to their result.

A state dict here is `dict[str, Tensor]`. Floating tensors are aggregated; integer buffers (BatchNorm's
`num_batches_tracked`) are taken from the first state, since they are counters, not estimates.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch

State = dict[str, torch.Tensor]


@dataclass(frozen=True)
class AggregateRule:
    kind: str  # "mean" | "median" | "trimmed"
    trim_fraction: float = 0.0

    def __str__(self) -> str:
        return f"trimmed:{self.trim_fraction:g}" if self.kind == "trimmed" else self.kind


def parse_aggregate(spec: str) -> AggregateRule:
    kind, _, argument = spec.partition(":")
    if kind in ("mean", "median") and not argument:
        return AggregateRule(kind)
    if kind == "trimmed":
        try:
            fraction = float(argument)
        except ValueError:
            raise ValueError(f"trimmed needs a fraction: trimmed:FRACTION, got {spec!r}") from None
        if not 0 <= fraction < 0.5:
            raise ValueError(f"trimmed:FRACTION needs 0 <= FRACTION < 0.5, got {spec!r}")
        return AggregateRule("trimmed", fraction)
    raise ValueError(f"unknown aggregate {spec!r}; use mean, median or trimmed:FRACTION")


class RunningWeightedMean:
    """A weighted mean folded in one state at a time, so memory stays flat however many arrive."""

    def __init__(self) -> None:
        self.total_weight = 0.0
        self.sums: State = {}
        self.counters: State = {}

    def add(self, state: Mapping[str, torch.Tensor], weight: float) -> None:
        if weight <= 0:
            raise ValueError(f"weights must be > 0, got {weight}")
        for name, tensor in state.items():
            if not tensor.is_floating_point():
                self.counters.setdefault(name, tensor.clone())
            elif name in self.sums:
                self.sums[name].add_(tensor.double(), alpha=weight)
            else:
                self.sums[name] = tensor.double() * weight
        self.total_weight += weight

    def result(self, like: Mapping[str, torch.Tensor]) -> State:
        if self.total_weight == 0:
            raise ValueError("no state was added")
        merged = {name: (total / self.total_weight).to(like[name].dtype) for name, total in self.sums.items()}
        return {name: merged.get(name, self.counters.get(name)) for name in like}


def weighted_mean(states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]) -> State:
    """The paper's rule: each device counts in proportion to its weight (its local sample count)."""
    running = RunningWeightedMean()
    for state, weight in zip(states, weights, strict=True):
        running.add(state, weight)
    return running.result(states[0])


def coordinate_median(states: Sequence[Mapping[str, torch.Tensor]]) -> State:
    """Per-coordinate median (the lower median for an even count); ignores sample counts."""
    return combine_coordinates(states, lambda stack: stack.median(dim=0).values)


def trimmed_mean(states: Sequence[Mapping[str, torch.Tensor]], fraction: float) -> State:
    """Per-coordinate mean after dropping the `fraction` largest and smallest values (Yin et al. 2018)."""
    trim = int(fraction * len(states))

    def trimmed(stack: torch.Tensor) -> torch.Tensor:
        if trim == 0:
            return stack.mean(dim=0)
        ordered = stack.sort(dim=0).values
        return ordered[trim : stack.shape[0] - trim].mean(dim=0)

    return combine_coordinates(states, trimmed)


def combine_coordinates(states: Sequence[Mapping[str, torch.Tensor]], reduce) -> State:
    first = states[0]
    merged: State = {}
    for name, tensor in first.items():
        if tensor.is_floating_point():
            merged[name] = reduce(torch.stack([state[name] for state in states])).to(tensor.dtype)
        else:
            merged[name] = tensor.clone()
    return merged


def aggregate(rule: AggregateRule, states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]):
    if not states:
        raise ValueError("cannot aggregate zero states")
    if rule.kind == "mean":
        return weighted_mean(states, weights)
    if rule.kind == "median":
        return coordinate_median(states)
    return trimmed_mean(states, rule.trim_fraction)


class ServerOptimizer:
    """FedOpt (Reddi et al. 2021): the server treats minus the aggregated delta as a gradient.

    `none` adopts the aggregate as it is (the paper's plain average); `sgd` moves `server_lr` of the way
    towards it; `adam` feeds the delta to Adam, whose state persists on the server across rounds.
    """

    def __init__(
        self, kind: str, lr: float, parameter_names: Iterable[str], betas: tuple[float, float] = (0.5, 0.9)
    ) -> None:
        self.kind = kind
        # Buffers (BatchNorm's running statistics) are estimates, not parameters: they adopt the aggregate.
        self.parameter_names = frozenset(parameter_names)
        self.lr = lr
        self.betas = betas
        self.parameters: dict[str, torch.nn.Parameter] = {}
        self.optimizer: torch.optim.Optimizer | None = None

    def step(self, current: Mapping[str, torch.Tensor], aggregated: Mapping[str, torch.Tensor]) -> State:
        if self.kind == "none":
            return {name: tensor.clone() for name, tensor in aggregated.items()}
        if self.kind == "sgd":
            return {
                name: (current[name] + self.lr * (aggregated[name] - current[name]))
                if name in self.parameter_names
                else aggregated[name].clone()
                for name in current
            }
        return self.adam_step(current, aggregated)

    def adam_step(self, current: Mapping[str, torch.Tensor], aggregated: Mapping[str, torch.Tensor]) -> State:
        floating = [name for name in current if name in self.parameter_names]
        if self.optimizer is None:
            self.parameters = {name: torch.nn.Parameter(current[name].detach().clone()) for name in floating}
            self.optimizer = torch.optim.Adam(self.parameters.values(), lr=self.lr, betas=self.betas)
        with torch.no_grad():
            for name in floating:
                self.parameters[name].copy_(current[name])
                self.parameters[name].grad = current[name] - aggregated[name]
        self.optimizer.step()
        return {
            name: self.parameters[name].detach().clone()
            if name in self.parameters
            else aggregated[name].clone()
            for name in current
        }

    def state_dict(self) -> dict:
        return {} if self.optimizer is None else self.optimizer.state_dict()
