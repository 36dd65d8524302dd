"""Each device's privacy loss (epsilon at the recipe's delta) over the rounds it took part in, and its budget.

A round of the proposed method is `local_steps` DP-SGD steps on the device's data, each on a batch of
`batch_size` of its `samples` examples: the accountant composes that many Poisson-subsampled Gaussian
mechanisms (sampling rate q = batch_size / samples, noise multiplier dp_noise) with Google's dp-accounting
RDP accountant. Rounds a device sat out cost it nothing. Transport-free: the simulator keeps one per
device, a device over MQTT keeps its own; both ask `allows_next` before training and `spend` after.

dp-accounting is imported here only when a private run asks for an epsilon: a board without DP needs nothing
new (`pip install edgegan[dp]`).
"""

from __future__ import annotations

import functools
import math

from edgegan.algorithms.config import TrainConfig


def sampling_rate(*, batch_size: int, samples: int) -> float:
    """The chance that one of the device's examples is in one step's batch, as the accountant takes it."""
    if samples < 1:
        raise ValueError(f"a device needs data to account for, got {samples} examples")
    return min(1.0, batch_size / samples)


@functools.lru_cache(maxsize=4096)
def epsilon_after(*, noise: float, rate: float, steps: int, delta: float) -> float:
    """Epsilon at `delta` after `steps` Poisson-subsampled Gaussian steps (noise multiplier `noise`,
    sampling rate `rate`), by dp-accounting's RDP accountant; 0 steps cost 0, no noise costs infinity."""
    if steps == 0:
        return 0.0
    if noise <= 0:
        return math.inf
    try:
        import dp_accounting
        from dp_accounting.rdp import rdp_privacy_accountant
    except ImportError:  # pragma: no cover - the message is the point
        raise ImportError(
            "DP accounting needs dp-accounting: pip install 'edgegan[dp]' (or pip install dp-accounting)"
        ) from None
    event = dp_accounting.PoissonSampledDpEvent(rate, dp_accounting.GaussianDpEvent(noise))
    accountant = rdp_privacy_accountant.RdpAccountant()
    accountant.compose(dp_accounting.SelfComposedDpEvent(event, steps))
    return float(accountant.get_epsilon(delta))


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
