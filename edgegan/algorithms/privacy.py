"""Each device's privacy loss (epsilon at the recipe's delta) over the rounds it took part in, and its budget;
and central DP at the server, whose loss is the run's.

A round of the proposed method is `local_steps` DP-SGD steps on the device's data, each on a batch of
`batch_size` of its `samples` examples: the accountant composes that many Poisson-subsampled Gaussian
mechanisms (sampling rate q = batch_size / samples, noise multiplier dp_noise) with Google's dp-accounting
RDP accountant. Rounds a device sat out cost it nothing. Transport-free: the simulator keeps one per
device, a device over MQTT keeps its own; both ask `allows_next` before training and `spend` after.

Central DP (DP-FedAvg, McMahan et al. ICLR 2018) protects a whole device's data (user level): the server
clips each device's change to the global discriminator to `central_dp_clip`, sums them, divides by the
number of updates a round expects (fixed, so one device moves the result by at most clip / expected) and
adds Gaussian noise of std `central_dp_noise` * clip / expected. Each round is one Gaussian mechanism on
every device's data; the server picks no devices at random, so no sampling amplification is claimed
(rate 1). The generator's steps read only the released discriminator: post-processing.

dp-accounting is imported here only when a private run asks for an epsilon: a board without DP needs nothing
new (`pip install edgegan[dp]`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping

import torch

from edgegan.algorithms.config import TrainConfig


def sampling_rate(*, batch_size: int, samples: int) -> float:
    """The chance that one of the device's examples is in one step's batch, as the accountant takes it."""
    if samples < 1:
        raise ValueError(f"a device needs data to account for, got {samples} examples")
    return min(1.0, batch_size / samples)


def dp_accounting_module():
    try:
        import dp_accounting
        import dp_accounting.rdp  # noqa: F401 - the accountant both functions below use
    except ImportError:  # pragma: no cover - the message is the point
        raise ImportError(
            "DP accounting needs dp-accounting: pip install 'edgegan[dp]' (or pip install dp-accounting)"
        ) from None
    return dp_accounting


def training_event(*, noise: float, rate: float, steps: int):
    """The DP event of `steps` Poisson-subsampled Gaussian steps: what a device's DP-SGD (and, at rate 1,
    the server's central release) is to the accountant."""
    dp_accounting = dp_accounting_module()
    event = dp_accounting.PoissonSampledDpEvent(rate, dp_accounting.GaussianDpEvent(noise))
    return dp_accounting.SelfComposedDpEvent(event, steps)


@functools.lru_cache(maxsize=4096)
def epsilon_after(*, noise: float, rate: float, steps: int, delta: float) -> float:
    """Epsilon at `delta` after `steps` Poisson-subsampled Gaussian steps (noise multiplier `noise`,
    sampling rate `rate`), by dp-accounting's RDP accountant; 0 steps cost 0, no noise costs infinity."""
    if steps == 0:
        return 0.0
    if noise <= 0:
        return math.inf
    accountant = dp_accounting_module().rdp.RdpAccountant()
    accountant.compose(training_event(noise=noise, rate=rate, steps=steps))
    return float(accountant.get_epsilon(delta))


def noise_for_epsilon(*, epsilon: float, rate: float, steps: int, delta: float) -> float:
    """The smallest noise multiplier whose `steps` steps at `rate` stay within `epsilon` at `delta` (the
    accountant's own calibration, dp_accounting.calibrate_dp_mechanism): to choose --dp-noise for a budget."""
    if not epsilon > 0 or steps < 1:
        raise ValueError(f"a target needs epsilon > 0 and steps >= 1, got {epsilon} and {steps}")
    dp_accounting = dp_accounting_module()
    return float(
        dp_accounting.calibrate_dp_mechanism(
            dp_accounting.rdp.RdpAccountant,
            lambda noise: training_event(noise=noise, rate=rate, steps=steps),
            epsilon, delta,
            dp_accounting.LowerEndpointAndGuess(1e-3, 1.0), tol=1e-4,
        )
    )  # fmt: skip


class DevicePrivacy:
    """One device's ledger: the rounds it trained on its data under `cfg`'s DP-SGD, and what they cost."""

    def __init__(self, *, cfg: TrainConfig, samples: int) -> None:
        if not cfg.private:
            raise ValueError("a privacy ledger is for a private recipe (dp_clip > 0)")
        self.cfg = cfg
        self.rate = sampling_rate(batch_size=cfg.batch_size, samples=samples)
        self.rounds = 0
        self.stopped = False  # set once the budget turned a round down; it never turns back

    def epsilon_for(self, rounds: int) -> float:
        """Epsilon after `rounds` rounds of this device's training."""
        cfg = self.cfg
        steps = rounds * cfg.local_steps
        return epsilon_after(noise=cfg.dp_noise, rate=self.rate, steps=steps, delta=cfg.dp_delta)

    @property
    def epsilon(self) -> float:
        """What the rounds it took part in have cost so far."""
        return self.epsilon_for(self.rounds)

    def allows_next(self) -> bool:
        """Whether one more round stays within the budget (always, without one); False from then on."""
        if self.stopped:
            return False
        if self.cfg.dp_epsilon and self.epsilon_for(self.rounds + 1) > self.cfg.dp_epsilon:
            self.stopped = True
        return not self.stopped

    def spend(self) -> None:
        """Count a round the device trained (and published a discriminator)."""
        self.rounds += 1


class CentralPrivacy:
    """The server's side of central DP: the noisy clipped mean it releases, and the rounds it released."""

    def __init__(self, *, cfg: TrainConfig, expected_updates: int) -> None:
        if not cfg.centrally_private:
            raise ValueError("central DP needs central_dp_clip > 0")
        if expected_updates < 1:
            raise ValueError(f"central DP needs at least one expected update a round, got {expected_updates}")
        self.clip = cfg.central_dp_clip
        self.noise = cfg.central_dp_noise
        self.delta = cfg.dp_delta
        self.expected = expected_updates
        self.rounds = 0

    def release(
        self,
        mean: Mapping[str, torch.Tensor],
        *,
        count: int,
        reference: Mapping[str, torch.Tensor],
        generator: torch.Generator,
    ) -> dict[str, torch.Tensor]:
        """`reference` + (the sum of `count` clipped changes, given as their `mean`) / expected + noise, on
        every floating tensor (a BatchNorm's statistics are data too); counters as `mean` has them."""
        std = self.noise * self.clip / self.expected
        released = {}
        for name, tensor in mean.items():
            if not tensor.is_floating_point():
                released[name] = tensor
                continue
            base = reference[name]
            change = (tensor.double() - base.double()) * (count / self.expected)
            noise = torch.randn(tensor.shape, generator=generator, dtype=torch.float64) * std
            released[name] = (base.double() + change + noise).to(tensor.dtype)
        self.rounds += 1
        return released

    @property
    def epsilon(self) -> float:
        """The run's epsilon at `delta` after the rounds released so far."""
        return epsilon_after(noise=self.noise, rate=1.0, steps=self.rounds, delta=self.delta)

    def report(self) -> dict:
        """For summary.json: what was released and what it cost (None: infinite, no noise)."""
        epsilon = self.epsilon
        return {
            "epsilon": epsilon if math.isfinite(epsilon) else None, "delta": self.delta,
            "rounds": self.rounds,
            "clip": self.clip, "noise": self.noise, "expected_updates": self.expected,
        }  # fmt: skip
