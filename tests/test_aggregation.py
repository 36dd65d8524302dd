import pytest
import torch

from edgegan.algorithms.aggregation import (
    RunningWeightedMean,
    ServerOptimizer,
    aggregate,
    coordinate_median,
    parse_aggregate,
    trimmed_mean,
    weighted_mean,
)


def states(*values: float) -> list[dict[str, torch.Tensor]]:
    return [
        {"w": torch.full((2, 3), value), "b": torch.tensor([value, -value]), "count": torch.tensor(7 + index)}
        for index, value in enumerate(values)
    ]


def test_weighted_mean_counts_each_device_by_its_sample_count():
    merged = weighted_mean(states(1.0, 4.0), [3.0, 1.0])
    assert torch.allclose(merged["w"], torch.full((2, 3), (3 * 1.0 + 4.0) / 4))
    assert torch.allclose(merged["b"], torch.tensor([1.75, -1.75]))


def test_integer_buffers_are_taken_from_the_first_state_not_averaged():
    merged = weighted_mean(states(1.0, 4.0), [1.0, 1.0])
    assert merged["count"].item() == 7 and merged["count"].dtype == torch.int64


def test_running_mean_folded_one_at_a_time_equals_the_batch_mean():
    inputs = [{"w": torch.randn(5, 5, generator=torch.Generator().manual_seed(i))} for i in range(6)]
    weights = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    running = RunningWeightedMean()
    for state, weight in zip(inputs, weights, strict=True):
        running.add(state, weight)
    expected = sum(w * s["w"] for s, w in zip(inputs, weights, strict=True)) / sum(weights)
    assert torch.allclose(running.result(inputs[0])["w"], expected, atol=1e-6)


def test_zero_or_negative_weight_is_refused():
    with pytest.raises(ValueError, match="weights must be > 0"):
        weighted_mean(states(1.0), [0.0])


def test_coordinate_median_ignores_one_poisoned_device():
    merged = coordinate_median(states(1.0, 1.1, 0.9, 1000.0, 1.05))
    assert torch.allclose(merged["w"], torch.full((2, 3), 1.05))


def test_trimmed_mean_drops_the_extremes_on_each_side():
    merged = trimmed_mean(states(-500.0, 1.0, 2.0, 3.0, 500.0), 0.2)
    assert torch.allclose(merged["w"], torch.full((2, 3), 2.0))


def test_trimmed_mean_with_zero_fraction_is_the_plain_mean():
    merged = trimmed_mean(states(1.0, 2.0, 6.0), 0.0)
    assert torch.allclose(merged["w"], torch.full((2, 3), 3.0))


def test_aggregate_dispatches_on_the_parsed_rule():
    inputs = states(0.0, 1.0, 100.0)
    assert aggregate(parse_aggregate("median"), inputs, [1, 1, 1])["w"][0, 0].item() == 1.0
    assert aggregate(parse_aggregate("mean"), inputs, [1, 1, 1])["w"][0, 0].item() == pytest.approx(101 / 3)
    assert aggregate(parse_aggregate("trimmed:0.34"), inputs, [1, 1, 1])["w"][0, 0].item() == 1.0


@pytest.mark.parametrize("spec", ["avg", "trimmed", "trimmed:0.5", "trimmed:-0.1", "median:2", "trimmed:x"])
def test_bad_aggregate_specs_are_refused_with_the_spec_quoted(spec):
    with pytest.raises(ValueError, match="trimmed|aggregate"):
        parse_aggregate(spec)


def test_server_optimizer_none_adopts_the_aggregate():
    current, target = {"w": torch.zeros(3)}, {"w": torch.ones(3)}
    assert torch.equal(ServerOptimizer("none", 1.0, ["w"]).step(current, target)["w"], torch.ones(3))


def test_server_sgd_moves_its_learning_rate_of_the_way_to_the_aggregate():
    current, target = {"w": torch.zeros(3)}, {"w": torch.full((3,), 2.0)}
    assert torch.allclose(
        ServerOptimizer("sgd", 0.25, ["w"]).step(current, target)["w"], torch.full((3,), 0.5)
    )


def test_server_adam_steps_towards_the_aggregate_by_its_learning_rate_and_keeps_state():
    optimizer = ServerOptimizer("adam", 0.01, ["w"])
    current = {"w": torch.zeros(3), "running_mean": torch.zeros(3)}
    target = {"w": torch.tensor([1.0, -2.0, 0.0]), "running_mean": torch.full((3,), 5.0)}
    stepped = optimizer.step(current, target)
    # Adam's first step has magnitude lr in the direction of the delta, whatever its size.
    assert torch.allclose(stepped["w"], torch.tensor([0.01, -0.01, 0.0]), atol=1e-6)
    # Buffers are estimates, not parameters: they take the aggregate.
    assert torch.equal(stepped["running_mean"], target["running_mean"])
    again = optimizer.step(stepped, target)
    assert again["w"][0] > stepped["w"][0]
    assert optimizer.state_dict()["state"]


def test_the_median_of_an_even_count_is_the_mean_of_the_two_middle_values_not_the_lower_one():
    merged = coordinate_median(states(1.0, 2.0, 4.0, 1000.0))
    assert torch.allclose(merged["w"], torch.full((2, 3), 3.0))
