"""DP-SGD on the devices' discriminator step, its accounting and its budget (docs/privacy.md)."""

import json
from dataclasses import replace

import dp_accounting
import pytest
import torch
from dp_accounting.rdp import rdp_privacy_accountant

from edgegan import wire
from edgegan.algorithms.config import TrainConfig
from edgegan.algorithms.privacy import DevicePrivacy, epsilon_after, noise_for_epsilon, sampling_rate
from edgegan.algorithms.privatesgd import clip_per_sample, per_sample_gradients
from edgegan.algorithms.proposed import LocalDiscriminator
from edgegan.algorithms.steps import PlainSgd, local_discriminator_steps, rng_for
from edgegan.config import resolve_train
from edgegan.models import ModelSpec, build_discriminator
from edgegan.runtime.runconfig import RunConfig
from edgegan.simulate import SimConfig, simulate

POINTS = ModelSpec((2,), latent_dim=8, width=16)
IMAGES = ModelSpec((1, 28, 28), latent_dim=8, width=4, d_norm="spectral")


def trained(spec: ModelSpec, cfg: TrainConfig, steps: int = 2) -> tuple[dict, float]:
    """(state, mean loss) after `steps` discriminator steps from a fixed start on fixed data."""
    torch.manual_seed(0)
    discriminator = build_discriminator(spec)
    data = torch.randn(64, *spec.sample_shape)
    fakes = torch.randn(16, *spec.sample_shape)
    optimizer = PlainSgd(discriminator.parameters(), 0.1)
    loss = local_discriminator_steps(
        discriminator, optimizer, data, lambda count: fakes[:count], cfg, rng_for(0, 2, 0, 0), steps, 16
    )
    return {name: tensor.clone() for name, tensor in discriminator.state_dict().items()}, loss


@pytest.mark.parametrize("loss", ["ns", "hinge", "wgan-gp"])
@pytest.mark.parametrize("spec", [POINTS, IMAGES], ids=["points", "spectral-images"])
def test_with_no_noise_and_a_clip_no_gradient_reaches_dp_sgd_is_plain_sgd(loss, spec):
    plain, plain_loss = trained(spec, TrainConfig(loss=loss))
    private, private_loss = trained(spec, TrainConfig(loss=loss, dp_clip=1e6))
    assert private_loss == pytest.approx(plain_loss, rel=1e-5, abs=1e-6)
    for name, tensor in plain.items():
        assert torch.allclose(private[name], tensor, atol=1e-6, rtol=1e-5), name


@pytest.mark.parametrize("recipe", [{"dp_clip": 0.01}, {"dp_clip": 1e6, "dp_noise": 1.0}])
def test_clipping_or_noise_changes_the_update(recipe):
    plain, _ = trained(POINTS, TrainConfig())
    private, _ = trained(POINTS, TrainConfig(**recipe))
    assert any(not torch.allclose(private[name], tensor, atol=1e-4) for name, tensor in plain.items())


def test_the_noise_comes_from_the_steps_seeded_stream():
    cfg = TrainConfig(dp_clip=1.0, dp_noise=1.0)
    first, _ = trained(POINTS, cfg)
    again, _ = trained(POINTS, cfg)
    assert all(torch.equal(first[name], tensor) for name, tensor in again.items())


@pytest.mark.parametrize("loss", ["ns", "wgan-gp"])
def test_per_sample_gradients_are_each_examples_own_and_clipping_bounds_their_norm(loss):
    torch.manual_seed(0)
    cfg = TrainConfig(loss=loss, gp_weight=1.0, dp_clip=0.05)
    discriminator = build_discriminator(POINTS)
    real, fake = torch.randn(6, 2) * 3, torch.randn(6, 2)
    mix = torch.rand(6, 1) if loss == "wgan-gp" else None
    gradients, losses = per_sample_gradients(discriminator, real, fake, mix, cfg)
    # Example 2's gradient is autograd's on that pair alone.
    from edgegan.algorithms.losses import logit_loss, penalty_of

    alone = logit_loss(loss, discriminator(real[2:3]), discriminator(fake[2:3]))
    if mix is not None:
        points = (mix[2:3] * real[2:3] + (1 - mix[2:3]) * fake[2:3]).requires_grad_(True)
        (at_points,) = torch.autograd.grad(discriminator(points).sum(), points, create_graph=True)
        alone = alone + cfg.gp_weight * penalty_of(at_points)
    expected = torch.autograd.grad(alone, list(discriminator.parameters()))
    assert losses[2] == pytest.approx(float(alone.detach()), rel=1e-5)
    for (name, rows), want in zip(gradients.items(), expected, strict=True):
        assert torch.allclose(rows[2], want, atol=1e-6), name

    def norms(grads):
        return sum(rows.flatten(1).pow(2).sum(dim=1) for rows in grads.values()).sqrt()

    assert (norms(gradients) > cfg.dp_clip).all()  # every example needed clipping here
    clipped = norms(clip_per_sample(gradients, cfg.dp_clip))
    assert (clipped <= cfg.dp_clip * (1 + 1e-5)).all()
    assert torch.allclose(clipped, torch.full_like(clipped, cfg.dp_clip), rtol=1e-4)


def test_epsilon_equals_the_accountants_own_step_by_step_composition():
    noise, rate, steps, delta = 1.1, 32 / 2500, 60, 1e-5
    accountant = rdp_privacy_accountant.RdpAccountant()
    for _ in range(steps):  # one step at a time: another path through the library than ours
        accountant.compose(dp_accounting.PoissonSampledDpEvent(rate, dp_accounting.GaussianDpEvent(noise)))
    assert epsilon_after(noise=noise, rate=rate, steps=steps, delta=delta) == pytest.approx(
        accountant.get_epsilon(delta), rel=1e-9
    )
    # A device's ledger: q = batch / its examples, local_steps steps per round it took part in.
    ledger = DevicePrivacy(cfg=TrainConfig(dp_clip=1.0, dp_noise=noise, local_steps=3), samples=2500)
    for _ in range(20):
        ledger.spend()
    assert ledger.rate == sampling_rate(batch_size=32, samples=2500) == rate
    assert ledger.epsilon == pytest.approx(accountant.get_epsilon(delta), rel=1e-9)
    assert epsilon_after(noise=0.0, rate=rate, steps=1, delta=delta) == float("inf")


@pytest.mark.parametrize("target", [1.0, 10.0])
def test_noise_for_a_target_epsilon_is_the_least_that_stays_within_it(target):
    rate, steps, delta = 0.25, 200, 1e-5
    noise = noise_for_epsilon(epsilon=target, rate=rate, steps=steps, delta=delta)
    assert epsilon_after(noise=noise, rate=rate, steps=steps, delta=delta) == pytest.approx(target, rel=1e-3)
    assert epsilon_after(noise=noise * 0.98, rate=rate, steps=steps, delta=delta) > target
    with pytest.raises(ValueError, match="epsilon > 0"):
        noise_for_epsilon(epsilon=0.0, rate=rate, steps=steps, delta=delta)


def test_a_device_past_its_budget_stops_for_good():
    cfg = TrainConfig(dp_clip=1.0, dp_noise=0.5, dp_epsilon=4.0)
    device = LocalDiscriminator(spec=POINTS, cfg=cfg, data=torch.randn(7623, 2), device_index=0, seed=0)
    ledger = device.privacy
    rounds = 0
    while device.within_budget():
        ledger.spend()
        rounds += 1
    assert rounds == 3 and ledger.epsilon <= 4.0 < ledger.epsilon_for(4)
    assert not device.within_budget() and ledger.stopped


@pytest.mark.parametrize(
    "recipe, named",
    [
        ({"dp_clip": -1.0}, "dp_clip"),
        ({"dp_noise": 1.0}, "dp_noise needs dp_clip"),
        ({"dp_clip": 1.0, "dp_delta": 1.0}, "dp_delta"),
        ({"dp_clip": 1.0, "dp_epsilon": 4.0}, "dp_epsilon"),
    ],
)
def test_bad_privacy_settings_are_refused_naming_the_setting(recipe, named):
    with pytest.raises(ValueError, match=named):
        TrainConfig(**recipe)


def test_a_run_configuration_from_before_dp_decodes_as_dp_off_and_dp_travels_to_devices():
    config = RunConfig(
        dataset="ring8", partition="iid", devices=2, seed=0, sample_shape=(2,), width=16, latent_dim=8,
        codec="fp32", schedule="sync", train=TrainConfig(dp_clip=1.0, dp_noise=0.8, dp_epsilon=5.0),
    )  # fmt: skip
    assert RunConfig.decode(config.encode()).train == config.train
    fields = json.loads(config.encode())
    for name in ("dp_clip", "dp_noise", "dp_delta", "dp_epsilon"):
        del fields["train"][name]
    old = RunConfig.decode(wire.encode_json(fields))
    assert not old.train.private and old.train.dp_epsilon == 0


def sim_config(tmp_path, name: str, algo: str = "serial", **recipe) -> SimConfig:
    return SimConfig(
        algo=algo, dataset="ring8", devices=2, partition="dirichlet:0.2", rounds=8, seed=0,
        out=tmp_path / name, train=resolve_train("ring8", recipe), width=16, latent_dim=4, eval_every=8,
        eval_samples=200,
    )  # fmt: skip


def test_in_the_simulator_a_device_past_its_budget_sits_out_and_the_run_goes_on(tmp_path):
    # dirichlet:0.2 gives the devices 7,623 and 12,377 examples: device 0 samples more of its data per step,
    # so its epsilon grows faster and it passes 4.0 first (after 3 rounds); device 1 stays within it.
    summary = simulate(sim_config(tmp_path, "budget", dp_clip=1.0, dp_noise=0.5, dp_epsilon=4.0))
    assert summary["rounds"] == 8 and summary["privacy_exhausted_at_round"] is None
    epsilons = summary["privacy"]
    assert epsilons["0"] == pytest.approx(epsilon_after(noise=0.5, rate=32 / 7623, steps=3, delta=1e-5))
    assert epsilons["1"] == pytest.approx(epsilon_after(noise=0.5, rate=32 / 12377, steps=8, delta=1e-5))
    assert epsilons["0"] <= 4.0 and epsilons["1"] <= 4.0
    # Device 0 sent nothing after round 3: 3 + 8 updates' bytes, not 16.
    plain = simulate(sim_config(tmp_path, "plain"))
    assert plain["privacy"] is None
    assert summary["bytes_up"] == pytest.approx(plain["bytes_up"] * 11 / 16)


def test_when_every_device_has_spent_its_budget_the_simulation_stops_and_says_when(tmp_path):
    # Budget 3.7: device 0 trains 1 round, device 1 trains 5; in round 6 neither may train.
    summary = simulate(sim_config(tmp_path, "spent", dp_clip=1.0, dp_noise=0.5, dp_epsilon=3.7))
    assert summary["privacy_exhausted_at_round"] == 6 and summary["rounds"] == 6


@pytest.mark.parametrize("algo", ["mdgan", "fedgan", "central"])
def test_dp_is_refused_for_the_baselines_in_one_line(tmp_path, algo):
    with pytest.raises(ValueError, match="--dp-clip is the proposed method's"):
        sim_config(tmp_path, algo, algo=algo, dp_clip=1.0)


def test_with_dp_off_nothing_is_imported_for_it():
    import subprocess
    import sys

    code = (
        "import sys, torch; from edgegan.algorithms.proposed import LocalDiscriminator; "
        "from edgegan.algorithms.config import TrainConfig; from edgegan.models import ModelSpec; "
        "d = LocalDiscriminator(spec=ModelSpec((2,), 8, 16), cfg=TrainConfig(), data=torch.randn(64, 2), "
        "device_index=0, seed=0); d.within_budget(); print('dp_accounting' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "False"  # fmt: skip


def test_edgegan_status_shows_a_device_whose_budget_is_spent_and_the_largest_epsilon():
    import io

    from rich.console import Console

    from edgegan import topics
    from edgegan.runtime.fleetview import FleetView, receive, render_fleet

    view = FleetView(run="demo", devices=2)
    spent = wire.encode_status("online", round=2, updates_sent=3, epsilon=3.99, privacy="budget-spent")
    training = wire.encode_status("online", round=7, updates_sent=8, epsilon=3.82, privacy="within-budget")
    receive(view, topics.status("demo", "device-0"), spent, retained=True)
    receive(view, topics.status("demo", "device-1"), training, retained=True)
    console = Console(file=io.StringIO(), width=160, color_system=None)
    console.print(render_fleet(view, 0.0))
    text = console.file.getvalue()
    row = next(line for line in text.splitlines() if "device-0" in line)
    assert "online: budget spent" in row
    assert "epsilon max 3.99" in text


def test_dp_composes_with_the_servers_norm_bound_which_only_judges_what_devices_published(tmp_path):
    # Clipping happens once, on the device, per example; the server's bound judges the published change
    # (post-processing): a bound nothing reaches changes nothing, one everything passes leaves D as it was,
    # and either way the devices spent the same epsilon, since they published.
    recipe = {"dp_clip": 1.0, "dp_noise": 1.0}
    free = simulate(sim_config(tmp_path, "free", **recipe))
    loose = simulate(replace(sim_config(tmp_path, "loose", **recipe), max_update_norm=1e6))
    tight = simulate(replace(sim_config(tmp_path, "tight", **recipe), max_update_norm=1e-9))
    weights = {name: torch.load(tmp_path / name / "generator.pt", weights_only=True)["state_dict"]
               for name in ("free", "loose")}  # fmt: skip
    assert all(torch.equal(weights["loose"][key], tensor) for key, tensor in weights["free"].items())
    assert loose["updates_rejected_norm"] == 0 and free["privacy"] == loose["privacy"]
    # (A round with every update left out reads as a diverged run, which the simulator stops.)
    rounds = tight["rounds"]
    assert tight["updates_rejected_norm"] == 2 * rounds
    assert tight["privacy"]["0"] == epsilon_after(noise=1.0, rate=32 / 7623, steps=rounds, delta=1e-5)


def test_the_parallel_schedule_trains_with_dp_and_accounts_the_same_way(tmp_path):
    summary = simulate(sim_config(tmp_path, "parallel", algo="parallel", dp_clip=1.0, dp_noise=1.0))
    assert summary["rounds"] == 8
    assert summary["privacy"]["1"] == epsilon_after(noise=1.0, rate=32 / 12377, steps=8, delta=1e-5)
