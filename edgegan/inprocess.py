"""Each algorithm's round, played in one process: devices are objects, messages are encoded only to be
counted. The steps called here are the transport-free ones of `edgegan.algorithms`, as in deployment."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch
from torch import nn

from edgegan import wire
from edgegan.algorithms import admission
from edgegan.algorithms.attacks import Poison, poison_state
from edgegan.algorithms.config import TrainConfig
from edgegan.algorithms.fedgan import FedganAgent, FedganServer
from edgegan.algorithms.mdgan import (
    MdganServer,
    MdganWorker,
    batch_assignment,
    swap_discriminators,
    swap_period,
)
from edgegan.algorithms.proposed import (
    GlobalGan,
    LocalDiscriminator,
    check_fakes,
    local_discriminators,
    sample_weights,
)
from edgegan.algorithms.staleness import apply_difference, difference
from edgegan.algorithms.steps import POISON_STREAM, cpu_state, rng_for
from edgegan.costmodel import LinkProfile, RoundTrace
from edgegan.downlink import DEFAULT_KEYFRAME_EVERY, DownlinkReceiver, DownlinkSender, deliver
from edgegan.models import ModelSpec
from edgegan.quorum import QuorumParallelRunner, check_quorum
from edgegan.torchdevice import CPU
from edgegan.transfer import Timer, mean, message_bytes, send_change, transmit, uplink_residuals

ALGORITHMS = ("serial", "parallel", "mdgan", "fedgan", "central")


class ProposedRunner:
    """Serial or parallel schedule of the proposed method; `networked=False` makes it the centralized GAN
    (one party holding all data, no transfers)."""

    def __init__(
        self,
        *,
        spec: ModelSpec,
        cfg: TrainConfig,
        shards: Sequence[torch.Tensor],
        seed: int,
        schedule: str,
        codec: str,
        networked: bool = True,
        poison: Poison | None = None,
        poisoned: int = 0,
        max_update_norm: float | str = 0.0,
        torch_device: torch.device = CPU,
        fakes: str = "device",
        keyframe_every: int = DEFAULT_KEYFRAME_EVERY,
        noise_secret: int | None = None,
    ):
        self.schedule = schedule
        # "server": the server draws each device's fakes and sends them with D instead of G (same numbers).
        self.fakes = check_fakes(fakes) if networked else "device"
        # Every update arrives fresh and once; the server's change rules still apply (non-finite changes,
        # and changes longer than the --max-update-norm bound, are left out), networked only.
        bound = admission.parse_update_bound(max_update_norm) if networked else admission.UNBOUNDED
        self.rules = admission.AdmissionRules(run="sim", update_bound=bound)
        self.rejected = 0
        self.accepted = 0  # with `rejected`: the share of rejections (edgegan/algorithms/health.py)
        self.codec = codec
        self.networked = networked
        self.seed = seed
        self.poison = poison
        # The last `poisoned` devices send poisoned discriminators.
        self.first_poisoned = len(shards) - poisoned if poison else len(shards)
        self.server = GlobalGan(
            spec, cfg, seed, torch_device=torch_device, expected_updates=len(shards),
            noise_secret=noise_secret,
        )
        # The downlink as over MQTT (edgegan/downlink.py): with a lossy codec, deltas with error feedback.
        # Every device receives every message here, so one receiver stands for all of them.
        self.downlink = DownlinkSender(codec=codec, keyframe_every=keyframe_every)
        self.receiver = DownlinkReceiver()
        self.devices = local_discriminators(
            spec=spec, cfg=cfg, shards=shards, seed=seed, torch_device=torch_device, fakes=self.fakes
        )
        # DP-SGD's ledgers (edgegan/algorithms/privacy.py), kept by the devices; one past its budget sits out.
        self.privacy = {device.device_index: device.privacy for device in self.devices if device.privacy}
        self.residuals = uplink_residuals(codec, len(self.devices))  # topk+: each device's error feedback

    @property
    def exhausted(self) -> bool:
        """Every device has stopped on its privacy budget: no discriminator will change any more."""
        return bool(self.privacy) and all(ledger.stopped for ledger in self.privacy.values())

    def epsilons(self) -> dict[int, float]:
        """Each device's epsilon so far (at the recipe's delta), for a private run's summary."""
        return {index: ledger.epsilon for index, ledger in self.privacy.items()}

    @property
    def generator(self) -> nn.Module:
        return self.server.generator

    @property
    def discriminator(self) -> nn.Module:
        return self.server.discriminator

    def device_message(self, round_index: int, device: LocalDiscriminator, generator_state, published):
        """--fakes server: (bytes down, D as received, its fake batches as received) for one device: the
        round's D message and the batches the server drew for it, in one message (edgegan/wire.py)."""
        batches = self.server.fakes_for(generator_state, device.device_index, round_index)
        download, received = self.transmit_model("work", published, wire.fake_tensors(batches))
        return download, wire.discriminator_state(received), wire.fake_batches(received)

    def transmit_model(self, kind: str, published, extras=None) -> tuple[int, dict]:
        """(bytes on the wire, the model and extras as a device holds them after the message)."""
        if not wire.is_lossy(self.codec):  # absolute fp32, exactly as before deltas
            sent = dict(published.tensors) | dict(extras or {})
            return transmit(kind, published.round, sent, self.codec)
        return deliver(published, self.receiver, kind=kind, extras=extras)

    def run_round(self, round_index: int) -> RoundTrace:
        trace = RoundTrace()
        server = self.server
        generator_state, discriminator_state = server.snapshot()
        drawn = {}
        if self.fakes == "server":
            # Drawn from G_t before the devices start (and before a parallel generator step).
            with Timer() as timer:
                published = self.downlink.publish(
                    round_index, wire.discriminator_tensors(discriminator_state)
                )
                for device in self.devices:
                    drawn[device.device_index] = self.device_message(
                        round_index, device, generator_state, published
                    )
            trace.server_before_s = timer.seconds
        elif self.networked:
            published = self.downlink.publish(
                round_index, wire.global_tensors(generator_state, discriminator_state)
            )
            download, received = self.transmit_model("global", published)
            generator_state, discriminator_state = (
                wire.generator_state(received),
                wire.discriminator_state(received),
            )
        g_loss = float("nan")
        if self.schedule == "parallel" and server.generator_due(round_index):
            # Overlaps the devices' work, so it can only use the discriminator it already has, D_t.
            with Timer() as timer:
                g_loss = server.update_generator(round_index)
            trace.server_overlap_s = timer.seconds
        updates, folded = [], set()
        for device in self.devices:
            if not device.within_budget():
                # Past its budget: it neither trains nor sends, as over MQTT (nothing to cost either).
                trace.device_compute_s.append(0.0)
                trace.bytes_down.append(0)
                trace.bytes_up.append(0)
                continue
            if self.fakes == "server":
                download, discriminator_state, fakes = drawn[device.device_index]
                with Timer() as timer:
                    update = device.update(round_index, None, discriminator_state, fakes)
            else:
                with Timer() as timer:
                    update = device.update(round_index, generator_state, discriminator_state)
            trace.device_compute_s.append(timer.seconds)
            if self.poison and device.device_index >= self.first_poisoned:
                rng = rng_for(self.seed, POISON_STREAM, device.device_index, round_index)
                update = replace(update, state=poison_state(update.state, self.poison, rng))
            if self.networked:
                trace.bytes_down.append(download)
                if wire.is_lossy(self.codec):
                    # As a device does: send the change from the model it received, quantised.
                    upload, received = send_change(
                        round_index, difference(update.state, discriminator_state), self.codec,
                        self.residuals.get(device.device_index),
                    )  # fmt: skip
                    state = apply_difference(
                        cpu_state(server.discriminator), wire.discriminator_state(received)
                    )
                else:
                    upload, received = transmit(
                        "update", round_index, wire.discriminator_tensors(update.state), self.codec
                    )
                    state = wire.discriminator_state(received)
                trace.bytes_up.append(upload)
                update = replace(update, state=state)
            else:
                trace.bytes_down.append(0)
                trace.bytes_up.append(0)
            open_round = admission.OpenRound(index=round_index, arrived=folded)
            verdict = admission.judge(
                self.rules, open_round, device=device.device_index, base_round=round_index
            )
            # Central: its one party's own step, nothing received to admit; non-finite is a divergence.
            if verdict.folds and self.networked:
                verdict = admission.judge_rebased(self.rules, update.state, cpu_state(server.discriminator))
            if not verdict.folds:
                self.rejected += 1
                continue
            self.accepted += 1
            folded.add(device.device_index)
            updates.append(update)
        with Timer() as timer:
            if updates:  # every update may have been left out (--max-update-norm): D stays as it is
                server.fold_discriminators(updates, sample_weights(updates), round_index)
            if self.schedule == "serial" and server.generator_due(round_index):
                g_loss = server.update_generator(round_index)
        trace.server_after_s = timer.seconds
        trace.d_loss = mean([update.d_loss for update in updates])
        trace.g_loss = g_loss
        return trace


class MdganRunner:
    def __init__(
        self, *, spec: ModelSpec, cfg: TrainConfig, shards: Sequence[torch.Tensor], seed: int, codec: str,
        torch_device: torch.device = CPU,
    ):  # fmt: skip
        self.codec = codec
        self.seed = seed
        self.server = MdganServer(spec, cfg, seed, len(shards), torch_device=torch_device)
        self.workers = [
            MdganWorker(
                spec=spec, cfg=cfg, data=shard, worker_index=index, seed=seed, torch_device=torch_device
            )
            for index, shard in enumerate(shards)
        ]
        self.period = swap_period(cfg, mean([float(shard.shape[0]) for shard in shards]))
        self.swaps = 0

    @property
    def generator(self) -> nn.Module:
        return self.server.generator

    def run_round(self, round_index: int) -> RoundTrace:
        trace = RoundTrace()
        with Timer() as timer:
            batches = self.server.generate_batches(round_index)
        trace.server_before_s = timer.seconds
        feedback, d_losses, g_losses = [], [], []
        for index, worker in enumerate(self.workers):
            for_g, for_d = batch_assignment(index, len(batches))
            # On CPU, as on a wire, and through the run's codec both ways: a lossy codec changes the
            # batches the worker trains on and the feedback the server backpropagates.
            sent = {"fake_d": batches[for_d].detach().cpu(), "fake_g": batches[for_g].detach().cpu()}
            download, received = transmit("samples", round_index, sent, self.codec)
            with Timer() as timer:
                error, d_loss, g_loss = worker.step(round_index, received["fake_d"], received["fake_g"])
            trace.device_compute_s.append(timer.seconds)
            upload, returned = transmit("feedback", round_index, {"feedback": error}, self.codec)
            trace.bytes_down.append(download)
            trace.bytes_up.append(upload)
            feedback.append(returned["feedback"])
            d_losses.append(d_loss)
            g_losses.append(g_loss)
        with Timer() as timer:
            self.server.apply_feedback(batches, feedback)
        trace.server_after_s = timer.seconds
        if (round_index + 1) % self.period == 0:
            # Worker-to-worker transfer: each worker uploads its D and downloads another's.
            with Timer() as timer:
                swap_discriminators(self.workers, self.seed, round_index)
            trace.server_after_s += timer.seconds
            self.swaps += 1
            for index, worker in enumerate(self.workers):
                size = message_bytes(
                    "swap",
                    round_index,
                    wire.discriminator_tensors(cpu_state(worker.discriminator)),
                    self.codec,
                )
                trace.bytes_up[index] += size
                trace.bytes_down[index] += size
        trace.d_loss, trace.g_loss = mean(d_losses), mean(g_losses)
        return trace


class FedganRunner:
    def __init__(
        self, *, spec: ModelSpec, cfg: TrainConfig, shards: Sequence[torch.Tensor], seed: int, codec: str,
        torch_device: torch.device = CPU,
    ):  # fmt: skip
        self.codec = codec
        self.server = FedganServer(spec, cfg, seed, torch_device=torch_device)
        self.agents = [
            FedganAgent(
                spec=spec, cfg=cfg, data=shard, device_index=index, seed=seed, torch_device=torch_device
            )
            for index, shard in enumerate(shards)
        ]

    @property
    def generator(self) -> nn.Module:
        return self.server.generator

    @property
    def discriminator(self) -> nn.Module:
        return self.server.discriminator

    def run_round(self, round_index: int) -> RoundTrace:
        trace = RoundTrace()
        generator_state, discriminator_state = self.server.snapshot()
        published = wire.global_tensors(generator_state, discriminator_state)
        download = message_bytes("gan", round_index, published, self.codec)
        updates = []
        for agent in self.agents:
            with Timer() as timer:
                update = agent.update(round_index, generator_state, discriminator_state)
            updates.append(update)
            trace.device_compute_s.append(timer.seconds)
            trace.bytes_down.append(download)
            tensors = wire.global_tensors(update.generator_state, update.discriminator_state)
            trace.bytes_up.append(message_bytes("gan", round_index, tensors, self.codec))
        with Timer() as timer:
            self.server.fold(updates)
        trace.server_after_s = timer.seconds
        trace.d_loss = mean([update.d_loss for update in updates])
        trace.g_loss = mean([update.g_loss for update in updates])
        return trace


def check_schedule(
    algo: str,
    *,
    devices: int,
    quorum: int = 0,
    tau: int = 1,
    poison: bool = False,
    max_update_norm: float | str = 0.0,
    fakes: str = "device",
    private: bool = False,
    centrally_private: bool = False,
    codec: str = "fp32",
) -> None:
    """The combinations the simulator plays (a ValueError names the flag otherwise): the one place for the
    rules that SimConfig and build_runner share. The update bound is the proposed method's: a fixed one
    is refused for the others, and auto (the default) does not apply to them."""
    bound = admission.parse_update_bound(max_update_norm)
    if algo not in ALGORITHMS:
        raise ValueError(f"--algo must be one of {', '.join(ALGORITHMS)}, got {algo!r}")
    if private and algo not in ("serial", "parallel"):
        raise ValueError(f"--dp-clip is the proposed method's device step (serial, parallel), not {algo}'s")
    if private and 0 < quorum < devices:
        raise ValueError("--dp-clip is simulated with --quorum equal to --devices")
    if centrally_private and algo not in ("serial", "parallel"):
        raise ValueError(
            f"--central-dp-clip is the proposed method's discriminator fold (serial, parallel), not {algo}'s"
        )
    check_fakes(fakes)
    if wire.is_sparse(codec) and algo not in ("serial", "parallel"):
        raise ValueError(f"--codec {codec} sparsifies the proposed method's updates (serial, parallel), "
                         f"not {algo}'s")  # fmt: skip
    if fakes == "server" and algo not in ("serial", "parallel"):
        raise ValueError(f"--fakes server is the proposed method's (serial, parallel), not {algo}'s")
    check_quorum(quorum or devices, devices, tau)
    if 0 < quorum < devices:
        if algo != "parallel":
            raise ValueError(f"--quorum below --devices is simulated for --algo parallel only, not {algo}")
        if poison:
            raise ValueError("--quorum below --devices is simulated without --poison")
    if poison and algo not in ("serial", "parallel"):
        raise ValueError(f"--poison is simulated for serial and parallel only, not {algo}")
    if bound.fixed and algo not in ("serial", "parallel"):
        raise ValueError(f"--max-update-norm applies to serial and parallel only, not {algo}")


def build_runner(
    algo: str,
    spec: ModelSpec,
    cfg: TrainConfig,
    shards: Sequence[torch.Tensor],
    seed: int,
    codec: str,
    *,
    poison: Poison | None = None,
    poisoned: int = 0,
    max_update_norm: float | str = 0.0,
    quorum: int = 0,
    tau: int = 1,
    speeds: Sequence[float] = (),
    link: LinkProfile | None = None,
    torch_device: torch.device = CPU,
    fakes: str = "device",
    keyframe_every: int = DEFAULT_KEYFRAME_EVERY,
    noise_secret: int | None = None,
):
    """`quorum` between 1 and len(shards) - 1 makes the parallel schedule close rounds without its
    stragglers (edgegan/quorum.py), played on an event clock with `speeds` and `link`. Every network
    trains on `torch_device`; what is transmitted is on CPU."""
    check_schedule(
        algo, devices=len(shards), quorum=quorum, tau=tau, poison=poison is not None,
        max_update_norm=max_update_norm, fakes=fakes, private=cfg.private,
        centrally_private=cfg.centrally_private, codec=codec,
    )  # fmt: skip
    common = {"spec": spec, "cfg": cfg, "shards": shards, "seed": seed, "codec": codec,
              "torch_device": torch_device}  # fmt: skip
    if 0 < quorum < len(shards):
        speeds = list(speeds) or [1.0] * len(shards)
        return QuorumParallelRunner(
            **common,
            quorum=quorum,
            tau=tau,
            speeds=speeds,
            link=link or LinkProfile(),
            fakes=fakes,
            keyframe_every=keyframe_every,
            max_update_norm=max_update_norm,
            noise_secret=noise_secret,
        )
    if algo in ("serial", "parallel"):
        return ProposedRunner(
            **common, schedule=algo, poison=poison, poisoned=poisoned, max_update_norm=max_update_norm,
            fakes=fakes, keyframe_every=keyframe_every, noise_secret=noise_secret,
        )  # fmt: skip
    if algo == "mdgan":
        return MdganRunner(**common)
    if algo == "fedgan":
        return FedganRunner(**common)
    # central: the same recipe on the union of the data, with the devices' combined batch in one place.
    union = torch.cat(list(shards))
    central_cfg = replace(cfg, batch_size=cfg.batch_size * len(shards))
    return ProposedRunner(
        spec=spec, cfg=central_cfg, shards=[union], seed=seed, schedule="serial", codec=codec,
        networked=False, torch_device=torch_device,
    )  # fmt: skip
