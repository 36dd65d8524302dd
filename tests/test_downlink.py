"""The downlink policy (edgegan/downlink.py): deltas with error feedback, keyframes, gaps."""

import pytest
import torch

from edgegan import wire
from edgegan.downlink import KEYFRAME_CODEC, Downlink, DownlinkReceiver, DownlinkSender, split, to_envelope


def drifting_model(rounds: int, seed: int = 0):
    """A source that takes a small step each round, as training does."""
    generator = torch.Generator().manual_seed(seed)
    state = {"G.w": torch.randn(64, 32, generator=generator), "D.w": torch.randn(128, generator=generator)}
    for _ in range(rounds):
        state = {name: tensor + 0.01 * torch.randn(tensor.shape, generator=generator)
                 for name, tensor in state.items()}  # fmt: skip
        yield state


def over_the_wire(message: Downlink, kind: str = "global") -> Downlink:
    payload = wire.encode(to_envelope(message, kind=kind, run="r", device="server"))
    return split(wire.decode(payload))[0]


def test_int8_deltas_track_the_source_within_one_step_while_requantised_weights_drift_further():
    sender = DownlinkSender(codec="int8+zstd", keyframe_every=1000)
    receiver = DownlinkReceiver()
    delta_errors, absolute_errors = [], []
    for round_index, source in enumerate(drifting_model(200)):
        reception = receiver.receive(over_the_wire(sender.publish(round_index, source)))
        assert reception is not None and reception.round == round_index
        for name, tensor in reception.tensors.items():
            assert torch.equal(tensor, sender.held[name])  # the device holds exactly the server's copy
        delta_errors.append(max(float((reception.tensors[n] - source[n]).abs().max()) for n in source))
        requantised = {n: wire.decode_tensor(n, wire.encode_tensor(t, "int8")) for n, t in source.items()}
        absolute_errors.append(max(float((requantised[n] - source[n]).abs().max()) for n in source))
    # The error of the delta path is half a step of the change's quantisation, round after round: it does
    # not accumulate (the last rounds are no worse than the first ones) and stays far below absolute int8.
    assert max(delta_errors[150:]) <= 2 * max(delta_errors[1:50])
    assert max(delta_errors[1:]) < 0.2 * min(absolute_errors)


def test_first_message_and_every_kth_are_exact_keyframes():
    sender = DownlinkSender(codec="int8", keyframe_every=5)
    kinds = [sender.publish(index, source).delta for index, source in enumerate(drifting_model(11))]
    assert kinds == [False, True, True, True, True, False, True, True, True, True, False]
    keyframe = sender.publish(10, {})  # the same round again: the same message
    assert keyframe.codec == KEYFRAME_CODEC and not keyframe.delta


def test_a_tensor_that_did_not_change_is_not_sent():
    sender = DownlinkSender(codec="int8+zstd")
    first = {"G.w": torch.ones(4, 4), "D.w": torch.zeros(8)}
    sender.publish(0, first)
    second = sender.publish(1, {"G.w": torch.ones(4, 4), "D.w": torch.full((8,), 0.5)})
    assert second.delta and set(second.tensors) == {"D.w"} and second.base_round == 0
    receiver = DownlinkReceiver()
    receiver.receive(over_the_wire(sender.keyframe()))
    assert receiver.held_round == 1  # a requested keyframe is the current version


def test_a_device_that_misses_a_delta_waits_for_a_keyframe_and_never_trains_on_a_wrong_base():
    sender = DownlinkSender(codec="int8+zstd", keyframe_every=1000)
    receiver = DownlinkReceiver()
    sources = list(drifting_model(6))
    for index in range(2):
        assert receiver.receive(over_the_wire(sender.publish(index, sources[index]))) is not None
    sender.publish(2, sources[2])  # lost on the way
    assert receiver.receive(over_the_wire(sender.publish(3, sources[3]))) is None  # base 2, holds 1
    assert receiver.needs_keyframe and receiver.gaps == 1 and receiver.held_round == 1
    reception = receiver.keyframe(over_the_wire(sender.keyframe(), kind="keyframe"))
    assert reception.round == 3 and not receiver.needs_keyframe
    assert all(torch.equal(reception.tensors[name], sender.held[name]) for name in sender.held)
    assert receiver.receive(over_the_wire(sender.publish(4, sources[4]))).round == 4


def test_a_joiner_keeps_a_work_delta_and_trains_on_its_fakes_once_a_keyframe_of_that_round_comes():
    sender = DownlinkSender(codec="int8", keyframe_every=1000)
    sources = list(drifting_model(3))
    sender.publish(0, sources[0])
    receiver = DownlinkReceiver()
    fakes = {"F.0": torch.ones(2, 2)}
    assert receiver.receive(sender.publish(1, sources[1]), fakes) is None
    reception = receiver.keyframe(sender.keyframe())
    assert reception.round == 1 and reception.extras == fakes


def test_a_change_the_model_does_not_hold_is_a_rejection():
    receiver = DownlinkReceiver()
    receiver.keyframe(
        Downlink(round=0, base_round=0, delta=False, codec="fp32", tensors={"D.w": torch.ones(3)})
    )
    bad = Downlink(round=1, base_round=0, delta=True, codec="int8", tensors={"D.w": torch.ones(4)})
    with pytest.raises(wire.WireError) as caught:
        receiver.receive(bad)
    assert caught.value.reason == "bad-shape"


def test_the_wire_refuses_a_downlink_delta_without_an_earlier_base():
    message = Downlink(round=3, base_round=3, delta=True, codec="int8", tensors={"D.w": torch.ones(3)})
    with pytest.raises(wire.WireError) as caught:
        wire.decode(wire.encode(to_envelope(message, kind="global", run="r", device="server")))
    assert caught.value.reason == "no-base"


def test_a_downlink_delta_may_leave_out_model_tensors_but_not_fake_batches():
    expected = {"D.w": (3,), "D.b": (1,), "F.0": (2, 2)}
    message = Downlink(round=1, base_round=0, delta=True, codec="int8", tensors={"D.w": torch.ones(3)})
    payload = wire.encode(
        to_envelope(message, kind="work", run="r", device="d", extras={"F.0": torch.ones(2, 2)})
    )
    assert set(wire.decode(payload, expected).tensors) == {"D.w", "F.0"}
    with pytest.raises(wire.WireError):
        wire.decode(wire.encode(to_envelope(message, kind="work", run="r", device="d")), expected)


def test_fp32_stays_absolute():
    sender = DownlinkSender(codec="fp32")
    source = {"D.w": torch.ones(3)}
    message = sender.publish(4, source)
    assert not message.delta and message.base_round == 4 and message.tensors["D.w"] is source["D.w"]
