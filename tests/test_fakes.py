"""--fakes server: the server draws each device's fake batches and sends them with D instead of G. The
numbers are the device-drawn ones (same FAKE_STREAM noise, same G), only the bytes differ."""

import pytest
import torch
from small_runs import IMAGES, POINTS, mnist_shards, ring8_shards

from edgegan import wire
from edgegan.algorithms.proposed import GlobalGan, LocalDiscriminator
from edgegan.config import resolve_train
from edgegan.costmodel import LinkProfile
from edgegan.inprocess import build_runner
from edgegan.models import ModelSpec
from edgegan.transfer import message_bytes


def play(algo, spec, cfg, shards, rounds, fakes, **extra):
    runner = build_runner(algo, spec, cfg, shards, 0, "fp32", fakes=fakes, **extra)
    traces = [runner.run_round(round_index) for round_index in range(rounds)]
    return runner, traces


def same_state(first, second):
    return all(torch.equal(first[name], second[name]) for name in first)


@pytest.mark.parametrize("algo", ["serial", "parallel"])
def test_server_drawn_fakes_give_the_same_ring8_generator_as_device_drawn(algo):
    cfg = resolve_train("ring8", {"local_steps": 2})
    device, device_traces = play(algo, POINTS, cfg, ring8_shards(), 6, "device")
    server, server_traces = play(algo, POINTS, cfg, ring8_shards(), 6, "server")
    assert same_state(device.generator.state_dict(), server.generator.state_dict())
    assert same_state(device.server.discriminator.state_dict(), server.server.discriminator.state_dict())
    assert [trace.d_loss for trace in device_traces] == [trace.d_loss for trace in server_traces]
    assert all(local.generator is None for local in server.devices)


def test_server_drawn_fakes_give_the_same_mnist_generator_batch_norm_buffers_included():
    cfg = resolve_train("mnist", {"batch_size": 8, "g_batch_size": 8})
    device, _ = play("serial", IMAGES, cfg, mnist_shards(), 3, "device")
    server, _ = play("serial", IMAGES, cfg, mnist_shards(), 3, "server")
    # state_dict holds BatchNorm's running buffers: drawing on the server left the global G's alone.
    assert same_state(device.generator.state_dict(), server.generator.state_dict())


def test_the_quorum_schedule_plays_server_drawn_fakes_to_the_same_generator():
    cfg = resolve_train("ring8", {})
    extra = dict(quorum=3, tau=2, speeds=[0.25, 0.5, 0.75, 1.0], link=LinkProfile())
    device, _ = play("parallel", POINTS, cfg, ring8_shards(), 6, "device", **extra)
    server, _ = play("parallel", POINTS, cfg, ring8_shards(), 6, "server", **extra)
    # Which updates a round folds depends on measured compute, so only the first round is pinned.
    assert all(local.generator is None for local in server.devices)
    assert server.staleness and device.staleness


def test_drawing_fakes_on_the_server_leaves_the_global_generator_unchanged():
    gan = GlobalGan(IMAGES, resolve_train("mnist", {"batch_size": 8}), seed=0)
    before = {name: tensor.clone() for name, tensor in gan.generator.state_dict().items()}
    batches = gan.fakes_for(gan.snapshot()[0], device_index=1, round_index=0)
    assert len(batches) == gan.cfg.local_steps and batches[0].shape == (8, 1, 28, 28)
    assert same_state(before, gan.generator.state_dict())


def test_a_device_without_generator_refuses_a_round_without_its_fakes():
    local = LocalDiscriminator(
        spec=POINTS, cfg=resolve_train("ring8", {}), data=ring8_shards()[0], device_index=0, seed=0,
        fakes="server",
    )  # fmt: skip
    assert local.generator is None
    with pytest.raises(ValueError, match="fake batches"):
        local.update(0, None, GlobalGan(POINTS, local.cfg, 0).snapshot()[1])


def test_fakes_server_is_refused_for_the_baselines():
    with pytest.raises(ValueError, match="--fakes server"):
        build_runner("fedgan", POINTS, resolve_train("ring8", {}), ring8_shards(), 0, "fp32", fakes="server")


@pytest.mark.parametrize("codec", ["fp32", "fp16"])
def test_mnist_width_32_sends_a_device_d_and_its_32_fakes_for_far_fewer_bytes_than_g_and_d(codec):
    spec = ModelSpec((1, 28, 28), latent_dim=64, width=32)
    cfg = resolve_train("mnist", {})
    assert cfg.batch_size == 32 and cfg.local_steps == 1
    gan = GlobalGan(spec, cfg, seed=0)
    generator_state, discriminator_state = gan.snapshot()
    both = message_bytes("global", 0, wire.global_tensors(generator_state, discriminator_state), codec)
    fakes = wire.fake_tensors(gan.fakes_for(generator_state, 0, 0))
    work = message_bytes("work", 0, wire.discriminator_tensors(discriminator_state) | fakes, codec)
    images = 32 * 28 * 28 * (4 if codec == "fp32" else 2)
    discriminator = message_bytes("work", 0, wire.discriminator_tensors(discriminator_state), codec)
    assert work == pytest.approx(discriminator + images, rel=0.01)
    print(codec, "G + D", both, "D + fakes", work, "ratio", work / both)
    assert work / both < 0.11


def test_the_simulator_counts_the_smaller_downlink_of_server_drawn_fakes():
    cfg = resolve_train("mnist", {"batch_size": 8, "g_batch_size": 8})
    _, device_traces = play("parallel", IMAGES, cfg, mnist_shards(), 1, "device")
    _, server_traces = play("parallel", IMAGES, cfg, mnist_shards(), 1, "server")
    assert sum(server_traces[0].bytes_down) < sum(device_traces[0].bytes_down)


def test_a_run_configuration_without_fakes_decodes_as_device_drawn_and_server_joins_without_g():
    from edgegan.runtime.device import join_partition
    from edgegan.runtime.runconfig import RunConfig

    config = RunConfig(
        dataset="ring8", partition="iid", devices=2, seed=0, sample_shape=(2,), width=32, latent_dim=8,
        codec="fp32", schedule="sync", train=resolve_train("ring8", {}), fakes="server",
    )  # fmt: skip
    assert RunConfig.decode(config.encode()) == config
    old = wire.decode_json(config.encode(), {})
    old.pop("fakes")
    assert RunConfig.decode(wire.encode_json(old)).fakes == "device"
    local = join_partition(config, index=1, given={}, data_dir=None)
    assert local.generator is None and local.device_index == 1


def test_a_device_agent_in_a_server_fakes_run_joins_decodes_and_trains_without_ever_building_a_generator(
    monkeypatch,
):
    import edgegan.algorithms.proposed as proposed
    from edgegan.runtime.connection import parse_broker
    from edgegan.runtime.device import DeviceAgent, DeviceSettings, join_partition
    from edgegan.runtime.runconfig import RunConfig

    cfg = resolve_train("mnist", {"batch_size": 8})
    config = RunConfig(
        dataset="mnist", partition="iid", devices=4, seed=0, sample_shape=(1, 28, 28), width=8, latent_dim=16,
        codec="fp32", schedule="sync", train=cfg, fakes="server",
    )  # fmt: skip
    gan = GlobalGan(ModelSpec((1, 28, 28), latent_dim=16, width=8), cfg, seed=0)
    generator_state, discriminator_state = gan.snapshot()
    work = wire.Envelope(
        kind="work", run="mem", round=0, base_round=0, device="device-1", samples=0, codec="fp32",
        tensors=wire.discriminator_tensors(discriminator_state) | wire.fake_tensors(gan.fakes_for(
            generator_state, 1, 0)),
    )  # fmt: skip

    def no_generator(*args, **kwargs):
        raise AssertionError("a --fakes server device built a generator")

    monkeypatch.setattr(proposed, "build_generator", no_generator)
    agent = DeviceAgent(
        DeviceSettings(run="mem", device="device-1", broker=parse_broker("mqtt://127.0.0.1:1")),
        join=lambda run_config: join_partition(run_config, index=1, given={}, data_dir=None),
    )
    agent.adopt(config, agent.join(config))
    assert agent.local.generator is None
    assert not any(name.startswith("G.") for name in agent.expected)
    received = wire.decode(wire.encode(work), agent.expected)
    discriminator_only = wire.tensor_shapes(discriminator=agent.local.discriminator.state_dict())
    update = wire.decode(agent.train_and_encode(received), discriminator_only)
    assert update.kind == "update" and update.base_round == 0


class FixedComputeTimer:
    """A Timer whose every block takes 10 ms: the quorum runner's event clock, and so which updates each
    round folds, no longer depend on how long this machine happened to take."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.seconds += 0.01


@pytest.mark.parametrize("tau", [1, 2])
def test_on_the_quorum_and_tau_path_server_drawn_fakes_give_the_device_drawn_generator_bit_for_bit(
    monkeypatch, tau
):
    import edgegan.quorum

    monkeypatch.setattr(edgegan.quorum, "Timer", FixedComputeTimer)
    cfg = resolve_train("ring8", {"local_steps": 2})
    extra = dict(quorum=3, tau=tau, speeds=[0.25, 0.5, 0.75, 1.0], link=LinkProfile())
    device, device_traces = play("parallel", POINTS, cfg, ring8_shards(), 8, "device", **extra)
    server, server_traces = play("parallel", POINTS, cfg, ring8_shards(), 8, "server", **extra)
    assert same_state(device.generator.state_dict(), server.generator.state_dict())
    assert same_state(device.server.discriminator.state_dict(), server.server.discriminator.state_dict())
    assert [trace.d_loss for trace in device_traces] == [trace.d_loss for trace in server_traces]
    # The quorum path was taken: stale updates were folded in (and, with tau 1, some dropped).
    assert device.staleness == server.staleness and device.staleness[1] > 0
    assert all(local.generator is None for local in server.devices)
