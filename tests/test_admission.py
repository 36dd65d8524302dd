"""Whether an arrival counts (edgegan/algorithms/admission.py): every rule, once, as a table of cases. The
simulator's runners, the MQTT server and the sharded collector all ask this policy."""

import math
from dataclasses import dataclass

import pytest

from edgegan.algorithms.admission import (
    FUTURE_ROUND,
    AdmissionRules,
    OpenRound,
    Outcome,
    Reporters,
    UpdateBound,
    check_envelope,
    judge,
    judge_change,
    judge_rebased,
    parse_update_bound,
    round_closes,
    screen,
)

SYNC = AdmissionRules(run="r")
PARALLEL = AdmissionRules(run="r", window=2)
GUARDED = AdmissionRules(
    run="r", allowed_devices=frozenset({"pi-0", "pi-1"}), max_payload_bytes=1000, max_samples=500,
    update_bound=UpdateBound(fixed=10.0),
)  # fmt: skip
AUTO = AdmissionRules(run="r", update_bound=parse_update_bound("auto"))


@dataclass
class Fields:
    kind: str = "update"
    run: str = "r"
    device: str = "pi-0"
    base_round: int = 5
    samples: int = 100


# (rules, open round, device, base round) -> (outcome, staleness, reason)
ROUND_CASES = [
    ("fresh", SYNC, OpenRound(index=5), "pi-0", 5, Outcome.FOLD, 0, ""),
    ("sync, one round old", SYNC, OpenRound(index=5), "pi-0", 4, Outcome.LATE, 1, ""),
    ("from the future", SYNC, OpenRound(index=5), "pi-0", 6, Outcome.REJECT, 0, "future-round"),
    ("second of a round", SYNC, OpenRound(index=5, arrived={"pi-0"}), "pi-0", 5, Outcome.DUPLICATE, 0, ""),
    ("after the quorum closed", SYNC, OpenRound(index=5, closed=True), "pi-0", 5, Outcome.LATE, 0, ""),
    ("counted before", SYNC, OpenRound(index=5, last_counted={"pi-0": 5}), "pi-0", 5, Outcome.REPLAY, 0,
     "replay"),
    ("counted: an older one", SYNC, OpenRound(index=5, last_counted={"pi-0": 4}), "pi-0", 5, Outcome.FOLD,
     0, ""),
    ("parallel, within tau", PARALLEL, OpenRound(index=5, held_bases={3, 4, 5}), "pi-0", 3, Outcome.FOLD, 2,
     ""),
    ("parallel, staler than tau", PARALLEL, OpenRound(index=5, held_bases={2, 3}), "pi-0", 2, Outcome.STALE,
     3, ""),
    ("parallel, base model gone", PARALLEL, OpenRound(index=5, held_bases={5}), "pi-0", 4, Outcome.STALE, 1,
     ""),
    ("parallel, duplicate before stale base", PARALLEL, OpenRound(index=5, arrived={"pi-0"}), "pi-0", 4,
     Outcome.DUPLICATE, 1, ""),
]  # fmt: skip


@pytest.mark.parametrize(
    "rules,open_round,device,base_round,outcome,staleness,reason",
    [case[1:] for case in ROUND_CASES],
    ids=[case[0] for case in ROUND_CASES],
)
def test_an_arrival_is_judged_by_its_round_against_the_open_round(
    rules, open_round, device, base_round, outcome, staleness, reason
):
    verdict = judge(rules, open_round, device=device, base_round=base_round)
    assert (verdict.outcome, verdict.staleness, verdict.reason) == (outcome, staleness, reason)
    assert verdict.folds == (outcome is Outcome.FOLD)


SCREEN_CASES = [
    ("anyone, any size", SYNC, "eve", 10**9, None),
    ("allowed and small", GUARDED, "pi-1", 1000, None),
    ("not allowed", GUARDED, "eve", 10, "unknown-device"),
    ("too large", GUARDED, "pi-0", 1001, "oversized"),
    ("no device name", SYNC, None, 10, "bad-field"),
]


@pytest.mark.parametrize(
    "rules,device,size,reason", [case[1:] for case in SCREEN_CASES], ids=[case[0] for case in SCREEN_CASES]
)
def test_before_decoding_an_arrival_is_screened_by_sender_and_size(rules, device, size, reason):
    verdict = screen(rules, device=device, payload_bytes=size)
    assert (verdict.reason if verdict else None) == reason
    assert verdict is None or verdict.counted_as == "rejected"


ENVELOPE_CASES = [
    ("as its topic says", GUARDED, Fields(), "update", "pi-0", None),
    ("another kind", GUARDED, Fields(kind="global"), "update", "pi-0", "bad-kind"),
    ("another run", GUARDED, Fields(run="other"), "update", "pi-0", "wrong-run"),
    ("on another's topic", GUARDED, Fields(device="pi-1"), "update", "pi-0", "device-mismatch"),
    ("no samples", GUARDED, Fields(samples=0), "update", "pi-0", "bad-field"),
    ("more samples than the data set", GUARDED, Fields(samples=501), "update", "pi-0", "bad-field"),
    ("any count without a data set size", SYNC, Fields(samples=10**6), "update", "pi-0", None),
    ("a partial sum counts no samples itself", SYNC, Fields(kind="partial", device="agg-0", samples=0),
     "partial", "agg-0", None),
]  # fmt: skip


@pytest.mark.parametrize(
    "rules,fields,kind,sender,reason",
    [case[1:] for case in ENVELOPE_CASES],
    ids=[case[0] for case in ENVELOPE_CASES],
)
def test_a_decoded_message_must_be_what_its_topic_promises(rules, fields, kind, sender, reason):
    verdict = check_envelope(rules, fields, kind=kind, sender=sender)
    assert (verdict.reason if verdict else None) == reason


CHANGE_CASES = [
    ("within the limit", GUARDED, 10.0, Outcome.FOLD, ""),
    ("longer than the limit", GUARDED, 10.5, Outcome.REJECT, "norm"),
    ("no limit", SYNC, 1e30, Outcome.FOLD, ""),
    ("overflowed", SYNC, math.inf, Outcome.REJECT, "non-finite"),
    ("not a number", GUARDED, math.nan, Outcome.REJECT, "non-finite"),
    ("auto: within twice the global's length", AUTO, 7.9, Outcome.FOLD, ""),
    ("auto: longer than twice the global's length", AUTO, 8.1, Outcome.REJECT, "norm"),
]


@pytest.mark.parametrize(
    "rules,length,outcome,reason", [case[1:] for case in CHANGE_CASES], ids=[case[0] for case in CHANGE_CASES]
)
def test_an_update_is_judged_by_the_length_of_its_change(rules, length, outcome, reason):
    verdict = judge_change(rules, length, staleness=1, global_length=4.0)
    assert (verdict.outcome, verdict.reason) == (outcome, reason)
    assert verdict.staleness == (1 if outcome is Outcome.FOLD else 0)


def test_each_outcome_is_counted_under_one_label():
    labels = {
        outcome: judge(SYNC, OpenRound(index=5, **state), device="pi-0", base_round=base).counted_as
        for outcome, state, base in [
            (Outcome.FOLD, {}, 5),
            (Outcome.LATE, {}, 4),
            (Outcome.DUPLICATE, {"arrived": {"pi-0"}}, 5),
            (Outcome.REPLAY, {"last_counted": {"pi-0": 5}}, 5),
            (Outcome.REJECT, {}, 6),
        ]
    }
    assert labels == {
        Outcome.FOLD: "accepted", Outcome.LATE: "late", Outcome.DUPLICATE: "duplicate",
        Outcome.REPLAY: "rejected", Outcome.REJECT: "rejected",
    }  # fmt: skip


@pytest.mark.parametrize(
    "value,bound",
    [("auto", UpdateBound(relative=2.0)), ("AUTO", UpdateBound(relative=2.0)), ("5", UpdateBound(fixed=5.0)),
     (5, UpdateBound(fixed=5.0)), ("0", UpdateBound()), (0.0, UpdateBound())],
)  # fmt: skip
def test_the_update_bound_is_auto_a_length_or_zero_for_none(value, bound):
    assert parse_update_bound(value) == bound


@pytest.mark.parametrize("value", ["-1", "nan", "foo", "inf", "", -1.0, True])
def test_a_bad_update_bound_is_one_error_naming_the_flag(value):
    with pytest.raises(ValueError, match=r"^--max-update-norm must be auto, a number > 0 or 0"):
        parse_update_bound(value)


def test_the_auto_bound_accepts_an_honest_update_and_rejects_a_x100_one():
    """Real parts: a ring8 device's discriminator after its local steps, then the same weights x100 (the
    --poison scale:100 attack)."""
    from small_runs import POINTS, ring8_shards

    from edgegan.algorithms.proposed import GlobalGan, local_discriminators
    from edgegan.config import resolve_train

    cfg = resolve_train("ring8", {})
    gan = GlobalGan(POINTS, cfg, seed=0)
    device = local_discriminators(spec=POINTS, cfg=cfg, shards=ring8_shards()[:1], seed=0)[0]
    generator_state, discriminator_state = gan.snapshot()
    for round_index in range(3):  # an honest device's first rounds, when it moves D the most
        update = device.update(round_index, generator_state, discriminator_state)
        assert judge_rebased(AUTO, update.state, discriminator_state).folds
    boosted = {name: tensor * 100 for name, tensor in update.state.items()}
    verdict = judge_rebased(AUTO, boosted, discriminator_state)
    assert (verdict.outcome, verdict.reason) == (Outcome.REJECT, "norm")
    assert judge_rebased(SYNC, boosted, discriminator_state).folds  # 0: the bound is off


def test_a_round_closes_once_every_device_reported_even_if_each_was_rejected():
    def closes(accepted, rejected, at_deadline=False, quorum=4, fleet=4):
        return round_closes(accepted=accepted, rejected=rejected, quorum=quorum, fleet=fleet, min_devices=1,
                            at_deadline=at_deadline)  # fmt: skip

    assert closes(0, 4) and closes(3, 1) and closes(4, 0)
    assert not closes(2, 1)
    assert not closes(3, 1, fleet=5)  # a rejected device does not close it before the rest reported
    assert closes(2, 0, quorum=2)
    assert closes(0, 1, at_deadline=True) and not closes(0, 0, at_deadline=True)


def test_a_stranger_whose_first_junk_beats_a_fleet_devices_first_update_does_not_report_for_it():
    """Fleet of 2, no allow-list: in round 0 pi-0's update folds and eve's junk arrives before pi-1's first
    update. eve is new in round 0, so her rejection is no report (the round waits for pi-1); once pi-1 has
    sent, three names for a fleet of two: only a name with an accepted update reports by a rejection."""
    names = Reporters(fleet=2)
    names.sent("pi-0", 0)
    names.folded("pi-0")
    names.sent("eve", 0)
    assert not names.counts("eve", 0, "norm")
    names.sent("pi-1", 0)
    assert not names.counts("eve", 1, "norm") and not names.counts("pi-1", 1, "norm")
    assert names.counts("pi-0", 1, "norm")


def test_a_fleet_device_rejected_from_the_start_reports_from_its_second_round():
    names = Reporters(fleet=2, sends_again={"unbound"})
    for device in ("pi-0", "eve"):
        names.sent(device, 0)
    names.folded("pi-0")
    assert not names.counts("eve", 0, "norm")  # new in this round: perhaps a stranger
    names.sent("eve", 1)
    assert names.counts("eve", 1, "norm")
    assert not names.counts("eve", 1, "unbound") and not names.counts("eve", 1, FUTURE_ROUND)  # sends again


def test_with_an_allow_list_only_allowed_names_report_by_a_rejection():
    names = Reporters(fleet=2, allowed={"pi-0", "pi-1"})
    names.sent("eve", 0)
    assert names.counts("pi-1", 0, "norm") and not names.counts("eve", 5, "norm")
