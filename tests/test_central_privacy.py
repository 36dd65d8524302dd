"""Central (user-level) DP at the server's fold (edgegan/algorithms/privacy.py, docs/privacy.md): the clip,
the fixed denominator, the noise's size and stream, the accountant, and the same numbers over Mosquitto."""

import json
import math

import dp_accounting
import pytest
import torch
from dp_accounting.rdp import rdp_privacy_accountant
from test_privacy_mqtt import MODEL, edgegan, generator_of
from test_reliability import Watcher

from edgegan import signing, topics
from edgegan.algorithms.aggregation import update_norm
from edgegan.algorithms.config import TrainConfig
from edgegan.algorithms.privacy import CentralPrivacy
from edgegan.algorithms.proposed import DiscriminatorUpdate, GlobalGan
from edgegan.config import resolve_train
from edgegan.models import ModelSpec
from edgegan.runtime.serving import CENTRAL_DP_PURPOSE
from edgegan.simulate import SimConfig, simulate

POINTS = ModelSpec((2,), latent_dim=8, width=16)
CENTRAL = TrainConfig(central_dp_clip=0.1, central_dp_noise=1.0)


def moved(state: dict, by: float) -> dict:
    """`state` with every floating tensor shifted by `by` in each coordinate."""
    return {name: tensor + by if tensor.is_floating_point() else tensor for name, tensor in state.items()}


def released(cfg: TrainConfig, updates: list[dict], *, expected: int, round_index: int = 0, secret=None):
    gan = GlobalGan(POINTS, cfg, seed=0, expected_updates=expected, noise_secret=secret)
    _, before = gan.snapshot()
    gan.fold_discriminators(
        [DiscriminatorUpdate(update(before), 100 * (index + 1), 0.0) for index, update in enumerate(updates)],
        [100.0 * (index + 1) for index in range(len(updates))], round_index,
    )  # fmt: skip
    return before, gan.snapshot()[1], gan


def test_each_change_is_clipped_counted_once_and_divided_by_the_rounds_expected_updates():
    no_noise = TrainConfig(central_dp_clip=0.1)
    boosted, small = (lambda state: moved(state, 10.0)), (lambda state: moved(state, 1e-6))
    before, after, _ = released(no_noise, [boosted, small], expected=4)
    change = update_norm(after, before)
    # the boosted change counts 0.1 (its clip), the small one its own length; over 4 expected, not 2
    small_length = update_norm(small(before), before)
    assert change == pytest.approx((0.1 + small_length) / 4, rel=1e-4)
    # sample counts (100 and 200 here) weigh nothing: one device moves the release by at most clip/expected
    one, _, _ = released(no_noise, [boosted], expected=4)
    assert update_norm(released(no_noise, [boosted], expected=4)[1], one) == pytest.approx(0.1 / 4, rel=1e-4)


def test_the_noise_has_std_noise_times_clip_over_expected_and_is_the_secrets_stream():
    still = [lambda state: state]  # a device that did not move: what is released is the noise alone
    before, after, gan = released(CENTRAL, still, expected=2)
    noise = torch.cat([(after[name] - before[name]).flatten() for name in before
                       if before[name].is_floating_point()])  # fmt: skip
    assert noise.numel() > 300
    assert float(noise.std()) == pytest.approx(1.0 * 0.1 / 2, rel=0.15)  # 337 draws: 4 standard errors
    assert abs(float(noise.mean())) < 0.01
    # the same round and secret draw the same noise; another secret or round draws other noise
    assert torch.equal(released(CENTRAL, still, expected=2)[1][next(iter(before))], after[next(iter(before))])
    for other in (released(CENTRAL, still, expected=2, secret=12345), released(CENTRAL, still, expected=2,
                                                                               round_index=1)):  # fmt: skip
        assert not torch.equal(other[1][next(iter(before))], after[next(iter(before))])
    assert gan.central.rounds == 1


def test_central_epsilon_is_the_accountants_gaussian_mechanism_composed_over_the_released_rounds():
    privacy = CentralPrivacy(cfg=TrainConfig(central_dp_clip=1.0, central_dp_noise=3.0), expected_updates=4)
    accountant = rdp_privacy_accountant.RdpAccountant()
    for _ in range(50):
        privacy.rounds += 1
        accountant.compose(dp_accounting.GaussianDpEvent(3.0))
    assert privacy.epsilon == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-9)
    report = privacy.report()
    assert report["rounds"] == 50 and report["delta"] == 1e-5 and report["expected_updates"] == 4
    silent = CentralPrivacy(cfg=TrainConfig(central_dp_clip=1.0), expected_updates=4)
    silent.rounds = 1
    assert math.isinf(silent.epsilon) and silent.report()["epsilon"] is None


@pytest.mark.parametrize(
    "recipe, named",
    [
        ({"central_dp_clip": -1.0}, "central_dp_clip"),
        ({"central_dp_noise": 1.0}, "central_dp_noise needs central_dp_clip"),
        ({"central_dp_clip": 1.0, "aggregate": "median"}, "aggregate mean"),
    ],
)
def test_bad_central_settings_are_refused_naming_the_setting(recipe, named):
    with pytest.raises(ValueError, match=named):
        TrainConfig(**recipe)


@pytest.mark.parametrize("algo", ["mdgan", "fedgan", "central"])
def test_central_dp_is_refused_for_the_baselines(tmp_path, algo):
    with pytest.raises(ValueError, match="--central-dp-clip is the proposed method's"):
        SimConfig(algo=algo, dataset="ring8", devices=2, partition="iid", rounds=2, seed=0, out=tmp_path,
                  train=resolve_train("ring8", {"central_dp_clip": 1.0}), width=16, latent_dim=4)  # fmt: skip


def replay(out, rounds: int, recipe: dict, secret: int | None) -> dict:
    """`edgegan run`'s set-up (2 devices, MODEL) in the simulator, its noise seeded from `secret`."""
    return simulate(
        SimConfig(
            algo="serial", dataset="ring8", devices=2, partition="iid", rounds=rounds, seed=0, out=out,
            train=resolve_train("ring8", recipe), width=32, latent_dim=8, eval_every=rounds,
            noise_secret=secret,
        )
    )  # fmt: skip


def test_central_dp_over_mosquitto_gives_the_simulators_generator_with_the_servers_secret(broker, tmp_path):
    """The server seeds its noise from its signing key (the run's seed is public); the simulator given that
    secret replays the run: the same generator and the same epsilon."""
    url, port = broker
    rounds, key = 5, tmp_path / "run" / signing.KEY_FILE  # the key the run's server made
    flags = ["--devices", "2", "--rounds", str(rounds), "--eval-every", str(rounds), *MODEL,
             "--central-dp-clip", "0.05", "--central-dp-noise", "0.5"]  # fmt: skip
    edgegan("run", "--broker", url, "--run", "cdp", "--out", str(tmp_path / "run"), *flags)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    secret = signing.Signer(signing.load_key(key)).secret(CENTRAL_DP_PURPOSE)
    recipe = {"central_dp_clip": 0.05, "central_dp_noise": 0.5}
    simulated = replay(tmp_path / "sim", rounds, recipe, secret)
    over_mqtt, in_process = generator_of(tmp_path / "run"), generator_of(tmp_path / "sim")
    for name, tensor in in_process.items():
        assert torch.allclose(over_mqtt[name], tensor, atol=1e-6, rtol=0), name
    assert summary["central_privacy"] == simulated["central_privacy"]
    assert summary["central_privacy"]["rounds"] == rounds and summary["central_privacy"]["epsilon"] > 0
    # the last metrics message (retained) carries it to `edgegan status` and the live view
    watcher = Watcher(port, "cdp", [topics.metrics("cdp")])
    try:
        metrics = watcher.wait_for(lambda seen: seen.get(topics.metrics("cdp")), timeout_s=10)[-1]
    finally:
        watcher.close()
    assert json.loads(metrics)["central_privacy"] == summary["central_privacy"]
    # with the run's seed instead of the secret the noise, and so the generator, differ
    seeded = replay(tmp_path / "seeded", rounds, recipe, None)
    assert seeded["central_privacy"] == simulated["central_privacy"]
    assert any(not torch.allclose(generator_of(tmp_path / "seeded")[name], tensor)
               for name, tensor in in_process.items())  # fmt: skip


@pytest.mark.parametrize("width", [None, 80])  # the wide table and the narrow screen's
def test_the_live_view_shows_the_servers_central_epsilon_from_its_metrics(width):
    import io

    from rich.console import Console

    from edgegan import wire
    from edgegan.runtime.fleetview import FleetView, receive, render_fleet

    view = FleetView(run="demo", devices=1)
    receive(view, topics.status("demo", "device-0"), wire.encode_status("online", round=3), retained=True)
    report = CentralPrivacy(cfg=CENTRAL, expected_updates=2).report() | {"epsilon": 7.25, "rounds": 40}
    metrics = wire.encode_json({"round": 40, "rounds": 100, "central_privacy": report})
    receive(view, topics.metrics("demo"), metrics, retained=True)
    console = Console(file=io.StringIO(), width=width or 160, color_system=None)
    console.print(render_fleet(view, 0.0, width=width))
    assert "central epsilon 7.25 after 40 rounds" in console.file.getvalue()
    silent = report | {"epsilon": None}  # clip without noise
    without_noise = wire.encode_json({"round": 40, "rounds": 100, "central_privacy": silent})
    receive(view, topics.metrics("demo"), without_noise, retained=True)
    console = Console(file=io.StringIO(), width=160, color_system=None)
    console.print(render_fleet(view, 0.0))
    assert "central epsilon inf after 40 rounds" in console.file.getvalue()
