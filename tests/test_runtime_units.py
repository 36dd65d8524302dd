"""Runtime pieces that need no broker: topics, staleness rules, link impairment, broker addresses."""

import asyncio
import os
import threading

import pytest
import torch

from edgegan import topics, wire
from edgegan.algorithms.staleness import parse_staleness_weight, rebase
from edgegan.runtime.broker import check_loopback
from edgegan.runtime.connection import parse_broker
from edgegan.runtime.impairment import ImpairedLink, LinkImpairment
from edgegan.runtime.offload import INLINE_MAX_BYTES, off_loop


def test_topics_live_under_the_run_and_name_the_device():
    assert topics.global_model("demo") == "edgegan/demo/global"
    assert topics.update("demo", "pi-3") == "edgegan/demo/update/pi-3"
    assert topics.all_updates("demo") == "edgegan/demo/update/+"
    assert topics.device_of("edgegan/demo/update/pi-3") == "pi-3"
    assert topics.device_of("edgegan/demo/global") is None


@pytest.mark.parametrize("name", ["", "a/b", "+", "#", "x" * 65, "dev ice"])
def test_names_that_would_break_topic_levels_are_refused(name):
    with pytest.raises(ValueError, match="name"):
        topics.update("demo", name)


def test_staleness_weights_discount_older_updates():
    assert parse_staleness_weight("constant")(3) == 1.0
    assert parse_staleness_weight("inverse")(1) == 0.5
    assert parse_staleness_weight("exp:0.5")(2) == pytest.approx(0.36787944)
    for spec in ("linear", "exp", "exp:-1", "inverse:2"):
        with pytest.raises(ValueError):
            parse_staleness_weight(spec)


def test_a_stale_update_contributes_its_own_change_on_top_of_the_current_model():
    base = {"w": torch.tensor([1.0, 1.0]), "n": torch.tensor(3)}
    update = {"w": torch.tensor([1.5, 0.0]), "n": torch.tensor(4)}
    current = {"w": torch.tensor([2.0, 2.0]), "n": torch.tensor(5)}
    rebased = rebase(update, base, current)
    assert torch.equal(rebased["w"], torch.tensor([2.5, 1.0])) and rebased["n"].item() == 4


@pytest.mark.parametrize(
    "settings",
    [{"drop_rate": 1.0}, {"drop_rate": -0.1}, {"delay_ms": float("nan")}, {"offline_every_s": 5.0},
     {"bandwidth_kbps": -1.0}],
)  # fmt: skip
def test_bad_link_settings_are_refused_naming_the_flag(settings):
    with pytest.raises(ValueError, match="--"):
        LinkImpairment(**settings)


def test_an_impaired_link_drops_about_its_rate_and_delays_by_size_over_bandwidth():
    link = ImpairedLink(LinkImpairment(drop_rate=0.2), seed=1)
    dropped = sum(link.drops() for _ in range(5000))
    assert 850 < dropped < 1150
    slow = ImpairedLink(LinkImpairment(delay_ms=100, bandwidth_kbps=80), seed=1)
    assert slow.delay_s(10_000) == pytest.approx(0.1 + 1.0)
    jittery = ImpairedLink(LinkImpairment(delay_ms=100, jitter_ms=50), seed=1)
    delays = [jittery.delay_s(0) for _ in range(1000)]
    assert 0.05 <= min(delays) < 0.06 and 0.14 < max(delays) <= 0.15


def test_an_unimpaired_link_neither_drops_nor_waits():
    link = ImpairedLink(LinkImpairment(), seed=0)
    assert asyncio.run(link.carry(10**6)) and link.delayed_s == 0 and link.dropped == 0


def test_broker_urls_are_parsed_or_refused():
    assert (parse_broker("mqtt://10.0.0.5:1884").host, parse_broker("mqtt://10.0.0.5:1884").port) == (
        "10.0.0.5",
        1884,
    )
    assert parse_broker("mqtt://broker").port == 1883
    for bad in ("http://x:1", "10.0.0.5:1883", "mqtt://:1883", "mqtt://x:port"):
        with pytest.raises(ValueError, match="--broker"):
            parse_broker(bad)


def test_the_embedded_broker_refuses_to_listen_beyond_loopback():
    check_loopback("127.0.0.1")
    check_loopback("localhost")
    with pytest.raises(ValueError, match="loopback"):
        check_loopback("0.0.0.0")


def test_arrivals_in_any_order_fold_into_the_discriminator_the_simulator_gets_in_device_order():
    import aiomqtt

    from edgegan.algorithms.config import TrainConfig
    from edgegan.algorithms.proposed import GlobalGan, LocalDiscriminator
    from edgegan.data import load_dataset
    from edgegan.models import ModelSpec
    from edgegan.runtime.server import ServerCoordinator
    from edgegan.runtime.server_settings import ServerSettings

    spec, cfg, data = ModelSpec((2,), 8, 32), TrainConfig(), load_dataset("ring8")
    names = ["device-1", "device-2", "device-10"]  # "device-10" < "device-2" as strings
    start = GlobalGan(spec, cfg, seed=0)
    generator_state, discriminator_state = start.snapshot()
    updates = {
        name: LocalDiscriminator(
            spec=spec, cfg=cfg, data=data.x[100 * index : 100 * (index + 1)], device_index=index, seed=0
        ).update(0, generator_state, discriminator_state)
        for index, name in enumerate(names)
    }

    published = b"\x07" * 32  # the digest of round 0's global model

    def message(name: str) -> aiomqtt.Message:
        envelope = wire.Envelope(
            kind="update", run="r", round=0, base_round=0, device=name, samples=updates[name].num_samples,
            codec="fp32", tensors=wire.discriminator_tensors(updates[name].state), loss=updates[name].d_loss,
            trained_on=published,
        )  # fmt: skip
        topic = topics.update("r", name)
        return aiomqtt.Message(topic, wire.encode(envelope), qos=1, retain=False, mid=1, properties=None)

    def server_fold(order: list[str]) -> tuple[dict, list[str]]:
        settings = ServerSettings(run="r", broker=parse_broker("mqtt://127.0.0.1:1883"), rounds=1, quorum=3,
                                  deadline_s=5, min_devices=1)  # fmt: skip
        gan = GlobalGan(spec, cfg, seed=0)
        server = ServerCoordinator(settings, gan, recorder=None)
        server.fold, server.history[0], arrivals = gan.begin_fold(0), discriminator_state, {}
        server.published.add(published)  # as if it had published the global model the updates name
        for name in order:
            asyncio.run(server.receive(message(name), 0, arrivals))
        gan.apply_fold(server.fold)
        return gan.discriminator.state_dict(), set(arrivals)

    simulator = GlobalGan(spec, cfg, seed=0)
    in_order = [updates[name] for name in names]
    simulator.fold_discriminators(in_order, [float(update.num_samples) for update in in_order], 0)
    for order in (names, list(reversed(names)), sorted(names)):
        folded, counted = server_fold(order)
        assert counted == set(names)
        expected = simulator.discriminator.state_dict()
        assert all(torch.equal(folded[key], value) for key, value in expected.items()), order


def test_a_change_applied_to_its_base_gives_back_the_update_and_counters_travel_as_they_are():
    from edgegan.algorithms.staleness import apply_difference, difference

    base = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(3)}
    update = {"w": torch.tensor([1.25, 1.5]), "n": torch.tensor(4)}
    change = difference(update, base)
    assert torch.equal(change["w"], torch.tensor([0.25, -0.5])) and change["n"].item() == 4
    assert torch.equal(apply_difference(base, change)["w"], update["w"])


def test_quantising_a_small_change_loses_far_less_than_quantising_the_weights():
    from edgegan import wire

    generator = torch.Generator().manual_seed(0)
    weights = torch.randn(1000, generator=generator)
    step = 1e-4 * torch.randn(1000, generator=generator)

    def roundtrip(tensor):
        message = wire.Envelope(
            kind="update",
            run="r",
            round=0,
            base_round=0,
            device="d",
            samples=1,
            codec="int8",
            tensors={"w": tensor},
        )
        return wire.decode(wire.encode(message)).tensors["w"]

    error_on_weights = (roundtrip(weights + step) - (weights + step)).abs().mean()
    error_on_change = (weights + roundtrip(step) - (weights + step)).abs().mean()
    assert error_on_weights > step.abs().mean()  # the step is lost in the weights' rounding
    assert error_on_change < 0.1 * step.abs().mean()


def test_small_jobs_run_on_the_event_loop_and_large_ones_in_a_worker_thread():
    async def threads() -> tuple[int, int, int]:
        here = threading.get_ident()
        small = await off_loop(INLINE_MAX_BYTES, threading.get_ident)
        large = await off_loop(INLINE_MAX_BYTES + 1, threading.get_ident)
        return here, small, large

    here, small, large = asyncio.run(threads())
    assert small == here and large != here


def openmp_threads() -> int:
    """What OpenMP (torch's libgomp) would use for a parallel region started in the calling thread."""
    import ctypes

    path = next((line.split()[-1] for line in open("/proc/self/maps") if "libgomp" in line), None)
    if path is None:
        pytest.skip("this torch is not built with GNU OpenMP")
    return ctypes.CDLL(path).omp_get_max_threads()


def test_the_event_loops_worker_threads_use_the_processs_torch_thread_count():
    # OpenMP's thread count is per thread: torch.set_num_threads(1) in the main thread leaves a worker
    # thread training on every core, with OpenMP threads spinning between kernels.
    from edgegan.runtime.offload import run_with_torch_workers

    torch.ones(2) @ torch.ones(2)  # loads torch's OpenMP runtime
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        plain = []
        thread = threading.Thread(target=lambda: plain.append(openmp_threads()))
        thread.start()
        thread.join()
        if (os.cpu_count() or 1) > 1:
            assert plain == [os.cpu_count()]  # the trap this guards against
        assert run_with_torch_workers(lambda: asyncio.to_thread(openmp_threads)) == 1
    finally:
        torch.set_num_threads(previous)


def test_feature_statistics_of_another_size_sender_or_run_are_rejected_and_counted():
    from edgegan.runtime.featurestats import StatisticsCollector

    def stats(device="device-0", run="r", dimension=64, samples=50):
        envelope = wire.stats_envelope(
            run=run, device=device, samples=samples, feature_sum=torch.zeros(dimension, dtype=torch.float64),
            outer_sum=torch.eye(dimension, dtype=torch.float64),
        )  # fmt: skip
        return wire.encode(envelope)

    collector = StatisticsCollector(run="r", devices=2, dimension=64, deadline_s=1.0, max_samples=100)
    collector.receive(topics.stats("r", "device-0"), stats(dimension=8))
    collector.receive(topics.stats("r", "device-0"), stats(device="device-1"))
    collector.receive(topics.stats("r", "device-0"), stats(run="other"))
    collector.receive(topics.stats("r", "device-0"), stats(samples=101))
    collector.receive(topics.stats("r", "device-0"), b"\x00garbage")
    assert collector.received == {}
    assert collector.rejected == {"bad-shape": 1, "wrong-sender": 2, "too-many-samples": 1, "not-msgpack": 1}
    collector.receive(topics.stats("r", "device-0"), stats())
    assert collector.received["device-0"].count == 50
