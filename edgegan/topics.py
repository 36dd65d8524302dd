"""The one place that knows topic names. Everything of a run lives under `edgegan/{run}/`.

edgegan/{run}/config            server -> devices: the run's configuration, JSON (QoS 1, retained)
edgegan/{run}/global            server -> devices: the global GAN and its round (QoS 1, retained)
edgegan/{run}/work/{device}     server -> one device, with --fakes server instead of global: the global D
                                and that device's fake batches, kind `work` (QoS 1, retained)
edgegan/{run}/keyframe          server -> devices that asked: the whole global model, exact, kind `keyframe`
                                (lossy codecs; QoS 1, retained; docs/protocol.md "Downlink deltas")
edgegan/{run}/update/{device}   device -> server: a trained local discriminator (QoS 1)
edgegan/{run}/status/{device}   device: "online" / "offline" (retained; the last will says offline)
edgegan/{run}/control           server -> devices: run-level commands such as "stop" (QoS 1, retained)
edgegan/{run}/metrics           server -> watchers: progress of the run, JSON (QoS 1, retained)
edgegan/{run}/stats/{device}    device -> server: its real-feature statistics for the Fréchet distance
                                (envelope kind `stats`; QoS 1, retained; docs/protocol.md)

Sharded aggregation (`--aggregators K`, docs/scaling.md), all QoS 1:
edgegan/{run}/claim/{aggregator}       aggregator -> server: "I hold device d's update for round t" (JSON)
edgegan/{run}/order/{aggregator}       server -> aggregator: add or drop a claimed update; close a round
edgegan/{run}/partial/{aggregator}     aggregator -> server: its partial sum for a closed round (envelope)
edgegan/{run}/aggregator/{aggregator}  aggregator: "online" / "offline" (retained, last will "offline")
Aggregators read the devices' updates through the MQTT 5 shared subscription
$share/edgegan-{run}/edgegan/{run}/update/+, so the broker hands each update to one of them.

Broker-wide, not per run (Mosquitto's $SYS tree, read by server identities only):
$SYS/broker/bytes/received, $SYS/broker/bytes/sent   the bytes the broker read and wrote since it started
                                                     (retained, republished every sys_interval seconds)
"""

from __future__ import annotations

import re

PREFIX = "edgegan"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def check_name(kind: str, name: str) -> str:
    """Run and device names become topic levels: no wildcards, separators or empty names."""
    if not NAME_PATTERN.match(name):
        raise ValueError(f"{kind} name {name!r} must be 1-64 letters, digits, '.', '_' or '-'")
    return name


def run_config(run: str) -> str:
    return f"{PREFIX}/{check_name('run', run)}/config"


def global_model(run: str) -> str:
    return f"{PREFIX}/{check_name('run', run)}/global"


def work(run: str, device: str) -> str:
    """One device's share of a round when the server draws the fakes (--fakes server): D and its batches."""
    return f"{PREFIX}/{check_name('run', run)}/work/{check_name('device', device)}"


def keyframe(run: str) -> str:
    """The latest requested keyframe: read only by a device that missed a delta or has just joined."""
    return f"{PREFIX}/{check_name('run', run)}/keyframe"


def update(run: str, device: str) -> str:
    return f"{PREFIX}/{check_name('run', run)}/update/{check_name('device', device)}"


def all_updates(run: str) -> str:
    return f"{PREFIX}/{check_name('run', run)}/update/+"


def status(run: str, device: str) -> str:
    return f"{PREFIX}/{check_name('run', run)}/status/{check_name('device', device)}"


def all_statuses(run: str) -> str:
    return f"{PREFIX}/{check_name('run', run)}/status/+"


def control(run: str) -> str:
    return f"{PREFIX}/{check_name('run', run)}/control"


def metrics(run: str) -> str:
    return f"{PREFIX}/{check_name('run', run)}/metrics"


def stats(run: str, device: str) -> str:
    return f"{PREFIX}/{check_name('run', run)}/stats/{check_name('device', device)}"


def all_stats(run: str) -> str:
    return f"{PREFIX}/{check_name('run', run)}/stats/+"


BROKER_BYTES_RECEIVED = "$SYS/broker/bytes/received"
BROKER_BYTES_SENT = "$SYS/broker/bytes/sent"


def broker_bytes() -> str:
    """Mosquitto's two byte counters (docs/protocol.md, "Bytes the broker counts")."""
    return "$SYS/broker/bytes/#"


def shared_updates(run: str) -> str:
    """Every device's updates, shared among the run's aggregators: each message goes to one of them."""
    return f"$share/{PREFIX}-{check_name('run', run)}/{all_updates(run)}"


def claim(run: str, aggregator: str) -> str:
    return f"{PREFIX}/{check_name('run', run)}/claim/{check_name('aggregator', aggregator)}"


def all_claims(run: str) -> str:
    return f"{PREFIX}/{check_name('run', run)}/claim/+"


def order(run: str, aggregator: str) -> str:
    return f"{PREFIX}/{check_name('run', run)}/order/{check_name('aggregator', aggregator)}"


def partial(run: str, aggregator: str) -> str:
    return f"{PREFIX}/{check_name('run', run)}/partial/{check_name('aggregator', aggregator)}"


def all_partials(run: str) -> str:
    return f"{PREFIX}/{check_name('run', run)}/partial/+"


def aggregator_status(run: str, aggregator: str) -> str:
    return f"{PREFIX}/{check_name('run', run)}/aggregator/{check_name('aggregator', aggregator)}"


def all_aggregator_statuses(run: str) -> str:
    return f"{PREFIX}/{check_name('run', run)}/aggregator/+"


def aggregator_of(topic: str) -> str | None:
    """The aggregator level of a claim, partial or aggregator-status topic, or None for other shapes."""
    levels = topic.split("/")
    if len(levels) == 4 and levels[0] == PREFIX and levels[2] in ("claim", "partial", "aggregator"):
        return levels[3]
    return None


def device_of(topic: str) -> str | None:
    """The device level of an update, status or stats topic, or None if the topic has another shape."""
    levels = topic.split("/")
    if len(levels) == 4 and levels[0] == PREFIX and levels[2] in ("update", "status", "stats"):
        return levels[3]
    return None


def access_rules(role: str) -> list[tuple[str, str]]:
    """Who may do what on every run's topics, as Mosquitto ACL rules `(access, topic filter)`. A `device`'s
    rules are patterns in which `%u` is its MQTT username, which is therefore its device name; a `server`
    identity (the server, the launcher's live view, aggregators) gets everything else; a `site` (a bridged
    site broker's login on the core broker) every device's rules."""
    every_run = f"{PREFIX}/+"
    if role == "device":
        return [
            ("write", f"{every_run}/update/%u"),
            ("write", f"{every_run}/status/%u"),  # its own status and last will
            ("write", f"{every_run}/stats/%u"),  # its own feature statistics
            ("read", f"{every_run}/config"),
            ("read", f"{every_run}/global"),
            ("read", f"{every_run}/keyframe"),
            ("read", f"{every_run}/work/%u"),  # its own fake batches and D (--fakes server)
            ("read", f"{every_run}/control"),
        ]
    if role == "server":
        return [
            ("write", f"{every_run}/config"),
            ("write", f"{every_run}/global"),
            ("write", f"{every_run}/keyframe"),
            ("write", f"{every_run}/work/+"),
            ("write", f"{every_run}/control"),
            ("readwrite", f"{every_run}/metrics"),
            ("read", f"{every_run}/update/+"),
            ("read", f"{every_run}/status/+"),
            ("read", f"{every_run}/stats/+"),
            ("readwrite", f"{every_run}/claim/+"),
            ("readwrite", f"{every_run}/order/+"),
            ("readwrite", f"{every_run}/partial/+"),
            ("readwrite", f"{every_run}/aggregator/+"),
            ("read", broker_bytes()),  # the broker's own byte counts, for summary.json
        ]
    if role == "site":
        # A site broker's bridge (broker/site.conf): every device's rules, for whichever of its devices.
        # The site broker holds each board's own login and ACL, so it vouches for the names it forwards.
        return [(access, topic_filter.replace("%u", "+")) for access, topic_filter in access_rules("device")]
    raise ValueError(f"role must be device, server or site, got {role!r}")


def bridge_topics() -> list[tuple[str, str]]:
    """A site broker's bridge lines `(topic filter, direction)`: what a device writes goes `out` to the core
    broker, what it reads comes `in` (broker/site.conf holds exactly these)."""
    rules = access_rules("site")
    return [(topic_filter, "out" if access == "write" else "in") for access, topic_filter in rules]
