"""Aggregation rules over device state dicts, and the server-side optimiser applied to their result.

A state dict here is `dict[str, Tensor]`. Floating tensors are aggregated; integer buffers (BatchNorm's
`num_batches_tracked`) are taken from the first state, since they are counters, not estimates.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

State = dict[str, torch.Tensor]


AGGREGATES = "mean, median, trimmed:FRACTION or clip:NORM"


@dataclass(frozen=True)
class AggregateRule:
    kind: str  # "mean" | "median" | "trimmed" | "clip"
    trim_fraction: float = 0.0
    clip_norm: float = 0.0

    def __str__(self) -> str:
        if self.kind == "trimmed":
            return f"trimmed:{self.trim_fraction:g}"
        if self.kind == "clip":
            return f"clip:{self.clip_norm:g}"
        return self.kind

    @property
    def streams(self) -> bool:
        """Whether the rule folds one update at a time (memory flat in N) or needs them all at once."""
        return self.kind in ("mean", "clip")


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
    if kind == "clip":
        try:
            norm = float(argument)
        except ValueError:
            raise ValueError(f"clip needs a norm: clip:NORM, got {spec!r}") from None
        if not norm > 0 or norm == float("inf"):
            raise ValueError(f"clip:NORM needs a finite NORM > 0, got {spec!r}")
        return AggregateRule("clip", clip_norm=norm)
    raise ValueError(f"unknown aggregate {spec!r}; use {AGGREGATES}")


@dataclass
class PartialSum:
    """One shard's share of a weighted mean (docs/scaling.md): the float64 sum of weight * tensor over the
    states it counted, their total weight, and how much of that weight came with tensors that are changes
    from the round's model rather than models (lossy codecs); whoever combines the shards adds that model
    back once, times `change_weight`."""

    sums: State
    total_weight: float
    change_weight: float = 0.0
    counters: State = field(default_factory=dict)


class RunningWeightedMean:
    """A weighted mean folded in one state at a time, so memory stays flat however many arrive.

    Sums are float64 and the division happens once, in `result`: each weight * float32 tensor is exact in
    float64 (for weights below 2**29), so splitting the states over shards and merging their partial sums
    changes the result only when a float64 addition rounds, far below float32's precision.
    """

    def __init__(self) -> None:
        self.total_weight = 0.0
        self.change_weight = 0.0
        self.sums: State = {}
        self.counters: State = {}

    def add(self, state: Mapping[str, torch.Tensor], weight: float, is_change: bool = False) -> None:
        """Folds in one state; `is_change` marks a change from the round's model (see `result`)."""
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
        if is_change:
            self.change_weight += weight

    def partial(self) -> PartialSum:
        """What a shard hands on: its sums as they are, not yet divided."""
        return PartialSum(self.sums, self.total_weight, self.change_weight, self.counters)

    def merge(self, partial: PartialSum) -> None:
        """Folds in another shard's partial sum, as if its states had been added here."""
        if not partial.total_weight > 0 or not 0 <= partial.change_weight <= partial.total_weight:
            raise ValueError(
                f"a partial sum needs total weight > 0 and 0 <= change weight <= total weight, got "
                f"{partial.total_weight} and {partial.change_weight}"
            )
        if self.sums and set(partial.sums) != set(self.sums):
            raise ValueError("partial sums over different tensors cannot be merged")
        for name, total in partial.sums.items():
            if name in self.sums:
                self.sums[name].add_(total.double())
            else:
                self.sums[name] = total.double().clone()
        for name, tensor in partial.counters.items():
            self.counters.setdefault(name, tensor.clone())
        self.total_weight += partial.total_weight
        self.change_weight += partial.change_weight

    def result(
        self, like: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor] | None = None
    ) -> State:
        """The mean, cast to `like`'s dtypes. States added as changes count as `base` + change."""
        if self.total_weight == 0:
            raise ValueError("no state was added")
        sums = self.sums
        if self.change_weight:
            if base is None:
                raise ValueError("changes were added, so the mean needs the model they change (base)")
            sums = {name: total + base[name].double() * self.change_weight for name, total in sums.items()}
        merged = {name: (total / self.total_weight).to(like[name].dtype) for name, total in sums.items()}
        return {name: merged.get(name, self.counters.get(name)) for name in like}


def weighted_mean(states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]) -> State:
    """The paper's rule: each device counts in proportion to its weight (its local sample count)."""
    running = RunningWeightedMean()
    for state, weight in zip(states, weights, strict=True):
        running.add(state, weight)
    return running.result(states[0])


def coordinate_median(states: Sequence[Mapping[str, torch.Tensor]]) -> State:
    """Per-coordinate median; ignores sample counts. For an even count, the mean of the two middle values:
    the lower one alone (torch.median's choice) biases every coordinate downwards each round, and that
    drift made a 2-D GAN diverge after about 800 rounds on 8 devices (measured)."""

    def median(stack: torch.Tensor) -> torch.Tensor:
        ordered = stack.sort(dim=0).values
        middle = stack.shape[0] // 2
        if stack.shape[0] % 2:
            return ordered[middle]
        return (ordered[middle - 1] + ordered[middle]) / 2

    return combine_coordinates(states, median)


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


def update_norm(state: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor]) -> float:
    """L2 norm of the change from `reference` over the floating tensors (inf if any is non-finite)."""
    total = 0.0
    for name, tensor in state.items():
        if tensor.is_floating_point():
            total += float((tensor.double() - reference[name].double()).pow(2).sum())
    return math.sqrt(total) if math.isfinite(total) else math.inf


def state_norm(state: Mapping[str, torch.Tensor]) -> float:
    """L2 norm of a state's floating tensors (what the auto update bound is relative to)."""
    total = sum(float(value.double().pow(2).sum()) for value in state.values() if value.is_floating_point())
    return math.sqrt(total) if math.isfinite(total) else math.inf


def clipped(state: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor], norm: float) -> State:
    """`state` moved back towards `reference` until its change is at most `norm` long (centred
    clipping, Karimireddy et al. 2021): a boosted update counts no more than an honest one."""
    length = update_norm(state, reference)
    if length <= norm:
        return dict(state)
    scale = norm / length
    return {
        name: reference[name] + (tensor - reference[name]) * scale if tensor.is_floating_point() else tensor
        for name, tensor in state.items()
    }


def aggregate(
    rule: AggregateRule,
    states: Sequence[Mapping[str, torch.Tensor]],
    weights: Sequence[float],
    reference: Mapping[str, torch.Tensor] | None = None,
):
    """`reference` (the current global state) is what `clip` measures each change from."""
    if not states:
        raise ValueError("cannot aggregate zero states")
    if rule.kind == "mean":
        return weighted_mean(states, weights)
    if rule.kind == "clip":
        if reference is None:
            raise ValueError("clip needs the current global state as its reference")
        return weighted_mean([clipped(state, reference, rule.clip_norm) for state in states], weights)
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
        self.pending_state: dict | None = None

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
            if self.pending_state is not None:  # restored from a checkpoint before the first step
                self.optimizer.load_state_dict(self.pending_state)
                self.pending_state = None
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

    def load_state_dict(self, state: dict) -> None:
        """Adam's moments from `state_dict`; its parameters are set from the current state each step."""
        if not state:
            return
        if self.kind != "adam":
            raise ValueError(f"a saved server optimiser state does not fit server_opt {self.kind!r}")
        self.pending_state = state
