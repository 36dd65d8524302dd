from dataclasses import replace

import pytest
import torch
from small_runs import IMAGES, POINTS, mnist_shards, ring8_shards

from edgegan.algorithms.config import TrainConfig
from edgegan.algorithms.mdgan import batch_assignment, batch_count, derangement, swap_period
from edgegan.algorithms.proposed import GlobalGan, LocalDiscriminator, sample_weights
from edgegan.algorithms.steps import clone_state, rng_for
from edgegan.costmodel import LinkProfile, RoundTrace, round_time_s
from edgegan.inprocess import ALGORITHMS, build_runner
from edgegan.models import build_discriminator, build_generator


def states_differ(before: dict, after: dict) -> bool:
    return any(
        not torch.equal(before[name], after[name]) for name in before if before[name].is_floating_point()
    )


def discriminators_of(runner) -> list[torch.nn.Module]:
    if hasattr(runner, "workers"):
        return [worker.discriminator for worker in runner.workers]
    return [runner.server.discriminator]


@pytest.mark.parametrize("algo", ALGORITHMS)
@pytest.mark.parametrize(
    "spec,shards", [(POINTS, ring8_shards), (IMAGES, mnist_shards)], ids=["ring8", "mnist"]
)
def test_every_algorithm_changes_the_generator_and_discriminators(algo, spec, shards):
    runner = build_runner(
        algo, spec, TrainConfig(batch_size=8, g_batch_size=8), shards(), seed=1, codec="fp32"
    )
    generator_before = clone_state(runner.generator)
    discriminators_before = [clone_state(net) for net in discriminators_of(runner)]
    for round_index in range(3):
        trace = runner.run_round(round_index)
    assert states_differ(generator_before, clone_state(runner.generator))
    for before, net in zip(discriminators_before, discriminators_of(runner), strict=True):
        assert states_differ(before, clone_state(net))
    assert torch.isfinite(torch.tensor(trace.d_loss)) and torch.isfinite(torch.tensor(trace.g_loss))


@pytest.mark.parametrize("algo", ALGORITHMS)
def test_the_same_seed_gives_the_same_generator_and_another_seed_a_different_one(algo):
    def final_generator(seed: int) -> dict:
        torch.manual_seed(1234)  # global RNG state must not matter
        runner = build_runner(algo, POINTS, TrainConfig(), ring8_shards(), seed=seed, codec="fp32")
        for round_index in range(4):
            runner.run_round(round_index)
        return clone_state(runner.generator)

    first, again, other = final_generator(3), final_generator(3), final_generator(4)
    assert all(torch.equal(first[name], again[name]) for name in first)
    assert states_differ(first, other)


def test_networked_algorithms_account_bytes_per_device_and_central_none():
    for algo in ("serial", "parallel", "mdgan", "fedgan"):
        trace = build_runner(algo, POINTS, TrainConfig(), ring8_shards(), 0, "fp32").run_round(0)
        assert len(trace.bytes_up) == len(trace.bytes_down) == 4
        assert min(trace.bytes_up) > 0 and min(trace.bytes_down) > 0
    trace = build_runner("central", POINTS, TrainConfig(), ring8_shards(), 0, "fp32").run_round(0)
    assert trace.bytes_up == [0] and trace.bytes_down == [0]


def test_proposed_method_uploads_only_the_discriminator_and_downloads_both_networks():
    trace = build_runner("serial", POINTS, TrainConfig(), ring8_shards(), 0, "fp32").run_round(0)
    d_bytes = sum(t.numel() * 4 for t in build_discriminator(POINTS).state_dict().values())
    g_bytes = sum(t.numel() * 4 for t in build_generator(POINTS).state_dict().values())
    assert d_bytes < trace.bytes_up[0] < d_bytes + 2048
    assert d_bytes + g_bytes < trace.bytes_down[0] < d_bytes + g_bytes + 4096


def test_mdgan_sends_two_fake_batches_down_and_one_feedback_batch_up_per_worker():
    cfg = TrainConfig(batch_size=10)
    trace = build_runner("mdgan", POINTS, cfg, ring8_shards(), 0, "fp32").run_round(0)
    sample_bytes = 10 * 2 * 4
    assert 2 * sample_bytes < trace.bytes_down[0] < 2 * sample_bytes + 1024
    assert sample_bytes < trace.bytes_up[0] < sample_bytes + 1024


def test_mdgan_sends_its_batches_and_feedback_through_the_runs_codec():
    """A lossy codec shrinks MD-GAN's messages and changes the numbers its parties train on, as it does
    the proposed method's: the comparison is transport against transport."""
    cfg = TrainConfig(batch_size=64)

    def after_rounds(codec: str):
        runner = build_runner("mdgan", IMAGES, cfg, mnist_shards(), 0, codec)
        traces = [runner.run_round(round_index) for round_index in range(2)]
        return traces[-1], clone_state(runner.generator)

    exact, exact_g = after_rounds("fp32")
    again, again_g = after_rounds("fp32")
    lossy, lossy_g = after_rounds("int8+zstd")
    assert all(torch.equal(exact_g[name], again_g[name]) for name in exact_g)
    assert states_differ(exact_g, lossy_g)
    assert sum(lossy.bytes_down) < sum(exact.bytes_down) / 3
    assert sum(lossy.bytes_up) < sum(exact.bytes_up) / 2


def test_mdgan_gives_each_worker_two_distinct_batches_when_k_exceeds_one():
    assert batch_count(TrainConfig(), 8) == 3  # ceil(ln 8)
    assert batch_count(TrainConfig(), 1) == 1
    for worker in range(8):
        for_g, for_d = batch_assignment(worker, 3)
        assert for_g != for_d


def test_mdgan_swaps_discriminators_so_that_no_worker_keeps_its_own():
    for seed in range(20):
        order = derangement(5, rng_for(seed, 0))
        assert sorted(order) == list(range(5)) and all(i != j for i, j in enumerate(order))


def test_mdgan_swap_period_is_one_local_epoch_of_batches():
    assert swap_period(TrainConfig(batch_size=10), mean_local_size=6000) == 600


def test_parallel_schedule_updates_the_generator_against_the_previous_discriminator():
    cfg = TrainConfig()
    runner = build_runner("parallel", POINTS, cfg, ring8_shards(), seed=5, codec="fp32")
    reference = GlobalGan(POINTS, cfg, seed=5)  # same initial G_0 and D_0
    runner.run_round(0)
    reference.update_generator(0)  # against D_0, with no device result folded in
    assert all(
        torch.equal(a, b)
        for a, b in zip(
            runner.generator.state_dict().values(), reference.generator.state_dict().values(), strict=True
        )
    )


def test_serial_schedule_updates_the_generator_against_the_new_average():
    cfg = TrainConfig()
    shards = ring8_shards()
    runner = build_runner("serial", POINTS, cfg, shards, seed=5, codec="fp32")
    reference = GlobalGan(POINTS, cfg, seed=5)
    devices = [
        LocalDiscriminator(spec=POINTS, cfg=cfg, data=shard, device_index=index, seed=5)
        for index, shard in enumerate(shards)
    ]
    g_state, d_state = reference.snapshot()
    updates = [device.update(0, g_state, d_state) for device in devices]
    reference.fold_discriminators(updates, sample_weights(updates), 0)
    reference.update_generator(0)
    runner.run_round(0)
    for name, tensor in reference.generator.state_dict().items():
        assert torch.equal(runner.generator.state_dict()[name], tensor)


def test_one_local_sgd_step_averaged_equals_one_sgd_step_on_the_mean_device_loss():
    """Why plain SGD + mean inherits centralized behaviour: the mean of one-step models is one step on the
    mean of the devices' gradients."""
    cfg = TrainConfig(loss="ns", device_opt="sgd", device_lr=0.05, local_steps=1)
    shards = ring8_shards()
    server = GlobalGan(POINTS, cfg, seed=2)
    g_state, d_state = server.snapshot()
    devices = [
        LocalDiscriminator(spec=POINTS, cfg=cfg, data=shard, device_index=index, seed=2)
        for index, shard in enumerate(shards)
    ]
    updates = [device.update(0, g_state, d_state) for device in devices]
    averaged = {name: sum(u.state[name] for u in updates) / len(updates) for name in d_state}

    # The same device draws with lr = 1 give each device's gradient at D_t: g_k = D_t - D_k(lr=1).
    unit = replace(cfg, device_lr=1.0)
    gradients = []
    for device in devices:
        replay = LocalDiscriminator(
            spec=POINTS, cfg=unit, data=device.data, device_index=device.device_index, seed=2
        )
        after = replay.update(0, g_state, d_state).state
        gradients.append({name: d_state[name] - after[name] for name in d_state})
    stepped = {
        name: d_state[name] - 0.05 * sum(g[name] for g in gradients) / len(gradients) for name in d_state
    }
    for name in d_state:
        assert torch.allclose(averaged[name], stepped[name], atol=1e-4)


def test_serial_round_costs_device_and_server_time_summed_and_parallel_their_maximum():
    link = LinkProfile(uplink_mbps=8.0, downlink_mbps=16.0, latency_ms=10.0)
    devices = dict(
        device_compute_s=[1.0, 2.0], bytes_down=[2_000_000, 2_000_000], bytes_up=[1_000_000, 1_000_000]
    )
    transfer = 0.01 + 1.0 + 0.01 + 1.0  # 2 MB at 16 Mbps down, 1 MB at 8 Mbps up, two latencies
    slowest = transfer + 2.0 / 0.5  # the second device runs at half speed
    serial = RoundTrace(**devices, server_after_s=3.0)
    parallel = RoundTrace(**devices, server_overlap_s=3.0, server_after_s=0.5)
    assert round_time_s(serial, [1.0, 0.5], link) == pytest.approx(slowest + 3.0)
    assert round_time_s(parallel, [1.0, 0.5], link) == pytest.approx(max(slowest, 3.0) + 0.5)
    fast_devices = RoundTrace(
        device_compute_s=[0.1, 0.1], bytes_down=[0, 0], bytes_up=[0, 0], server_overlap_s=3.0
    )
    assert round_time_s(fast_devices, [1.0, 1.0], link) == pytest.approx(3.0)


@pytest.mark.parametrize(
    "settings",
    [
        {"loss": "l2"},
        {"device_opt": "rmsprop"},
        {"server_opt": "yogi"},
        {"batch_size": 0},
        {"device_lr": -1.0},
        {"critic_ratio": 0},
        {"aggregate": "trimmed:0.7"},
        {"g_beta1": 1.0},
    ],
)
def test_bad_training_settings_are_refused_naming_the_setting(settings):
    with pytest.raises(ValueError):
        TrainConfig(**settings)


def test_a_lossy_codec_passes_a_diverging_runs_nan_on_as_fp32_does_instead_of_raising():
    """MD-GAN's feedback turned NaN before its weights did; decoding int8 NaN raised out of the run."""
    from edgegan.transfer import transmit

    tensors = {"feedback": torch.tensor([[1.0, float("nan"), 2.0]])}
    for codec in ("int8+zstd", "fp16"):
        size, received = transmit("feedback", 3, tensors, codec)
        assert size > 0 and torch.isnan(received["feedback"]).any()
    size, received = transmit("feedback", 3, {"feedback": torch.ones(1, 3)}, "int8+zstd")
    assert torch.equal(received["feedback"], torch.ones(1, 3))


def test_a_spectral_discriminator_keeps_the_plain_state_dict_and_has_unit_spectral_norm_layers():
    import torch

    from edgegan.models import ModelSpec, build_discriminator, spectrally_normalised

    plain = build_discriminator(ModelSpec((1, 28, 28), 8, 4, d_width=6))
    spectral = build_discriminator(ModelSpec((1, 28, 28), 8, 4, d_width=6, d_norm="spectral"))
    assert {k: v.shape for k, v in plain.state_dict().items()} == {
        k: v.shape for k, v in spectral.state_dict().items()
    }
    spectral.load_state_dict(plain.state_dict())
    x = torch.randn(3, 1, 28, 28)
    assert not torch.allclose(plain(x), spectral(x))
    for tensor in spectral.state_dict().values():
        if tensor.dim() > 1:
            norm = torch.linalg.matrix_norm(spectrally_normalised(tensor).flatten(1), ord=2)
            assert abs(norm.item() - 1.0) < 1e-5
