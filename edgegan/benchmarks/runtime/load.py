"""Section 4b: a server fed by the load generator's N light clients: updates per second and the server's
memory against N."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
from pathlib import Path

from edgegan.benchmarks.runtime.harness import (
    Broker,
    Sizes,
    edgegan_command,
    median,
    read_metrics,
    read_trace,
    reap,
    round_durations,
    start,
)
from edgegan.benchmarks.runtime.report import matplotlib_pyplot, table


def section_load(sizes: Sizes, work: Path, broker: Broker) -> tuple[list[str], dict]:
    from edgegan.config import resolve_run
    from edgegan.data import load_dataset
    from edgegan.models import ModelSpec, build_discriminator
    from edgegan.runtime.connection import parse_broker
    from edgegan.runtime.loadgen import LoadSettings, encode_updates, generate_load

    spec = ModelSpec(
        load_dataset("mnist").sample_shape,
        resolve_run("mnist", "latent_dim", None),
        resolve_run("mnist", "width", None),
    )
    state = build_discriminator(spec).state_dict()
    state_mb = sum(tensor.numel() * tensor.element_size() for tensor in state.values()) / 2**20
    total_rounds = sizes.load_rounds + 2  # a warm-up round, the measured rounds, the final evaluated round
    results = []
    for clients in sizes.load_clients:
        run_name = f"bench-load-{clients}-{os.getpid()}"
        out = work / f"load-{clients}"
        shutil.rmtree(out, ignore_errors=True)
        settings = LoadSettings(
            run=run_name,
            broker=parse_broker(broker.url),
            clients=clients,
            rounds=total_rounds,
            connections=min(sizes.load_connections, clients),
            timeout_s=20 * 60,
        )
        print(
            f"  load: {clients} clients, encoding {clients * total_rounds} updates",
            file=sys.stderr,
            flush=True,
        )
        payloads = encode_updates(settings, state)
        server = start(
            edgegan_command(
                "server",
                "--broker",
                broker.url,
                "--run",
                run_name,
                "--dataset",
                "mnist",
                "--fakes",  # the light clients answer the one global model, as device-drawn fakes do
                "device",
                "--devices",
                str(clients),
                "--rounds",
                str(total_rounds),
                "--eval-every",
                str(total_rounds),
                "--deadline-s",
                "600",
                "--out",
                str(out),
                "--log-level",
                "warning",
            ),
            work / f"load-{clients}-server.log",
        )
        try:
            report = asyncio.run(generate_load(settings, payloads))
        except BaseException:
            reap({"server": server}, 0)  # stops it: no load will come
            raise
        measured = reap({"server": server}, 10 * 60)["server"]
        del payloads
        if measured.returncode != 0:
            raise RuntimeError(
                f"the server failed with {clients} load clients; see {work}/load-{clients}-server.log"
            )
        summary = json.loads((out / "summary.json").read_text())
        durations = round_durations(read_metrics(out))
        traces = {row["round"]: row for row in read_trace(out)}
        round_s = median(list(durations.values()))
        measured_rounds = [done for done in durations if done in traces]
        after_s = median([traces[done]["server_after_s"] for done in measured_rounds])
        collect_s = median(
            [
                durations[done] - traces[done]["server_before_s"] - traces[done]["server_after_s"]
                for done in measured_rounds
            ]
        )
        results.append(
            {
                "clients": clients,
                "round_median_s": round_s,
                "updates_per_s": clients / round_s,
                "after_median_s": after_s,
                "collect_median_s": collect_s,
                "collect_updates_per_s": clients / collect_s,
                "server_rss_mb": measured.max_rss_mb,
                "server_cpu_s": measured.cpu_s,
                "accepted": summary.get("updates_accepted"),
                "expected": clients * total_rounds,
                "publish_median_s": median(report.publish_s),
                "published": report.published,
            }
        )
    rows = [
        [
            item["clients"],
            f"{item['accepted']} of {item['expected']}",
            item["round_median_s"] * 1000,
            item["updates_per_s"],
            item["collect_median_s"] * 1000,
            item["collect_updates_per_s"],
            item["after_median_s"] * 1000,
            item["publish_median_s"] * 1000,
            item["server_rss_mb"],
            item["server_rss_mb"] - results[0]["server_rss_mb"],
            (item["clients"] - results[0]["clients"]) * state_mb,
        ]
        for item in results
    ]
    plot_load(results, work.parent.parent / "load-clients.png")
    growth = results[-1]["server_rss_mb"] - results[0]["server_rss_mb"]
    held = (results[-1]["clients"] - results[0]["clients"]) * state_mb
    flat = growth < 0.25 * held + RSS_NOISE_MB
    lines = [
        f"`edgegan server --dataset mnist --devices N` over {broker.name}, fed by the load generator "
        "(`edgegan/runtime/loadgen.py`): N logical clients multiplexed over "
        f"min(N, {sizes.load_connections}) MQTT connections — not N real connections — each answering "
        "every global model at once with a valid fp32 update envelope (the MNIST discriminator, "
        f"{state_mb * 1024:.0f} kB) encoded before the run, on its own topic `update/load-K`. "
        f"{sizes.load_rounds} measured rounds per N (plus a warm-up round and the final, evaluated round). "
        "*Round* is the server's round wall time (publish the global model, receive and decode N updates, "
        "fold, step G; metrics.csv) and *updates/s* = N / round; *collect* is the part of the round between "
        "publishing the global model and the last update accepted (round - `server_before_s` - "
        "`server_after_s` of trace.jsonl), with its own updates/s; *fold + G* is `server_after_s` "
        "(aggregating the N updates, the server optimiser, the generator step); *publish* is the "
        "generator's time from its first to its last PUBACK of a round; *peak RSS* is the server "
        "process's (wait4).",
        "",
        *table(
            [
                "N",
                "updates accepted",
                "round ms",
                "updates/s",
                "collect ms",
                "updates/s while collecting",
                "fold + G ms",
                "publish ms",
                "server peak RSS MB",
                f"RSS over N={results[0]['clients']} MB",
                "N x update size MB",
            ],
            rows,
        ),
        "",
        "Does the server's memory stay flat as N grows? " + memory_answer(growth, held, results, state_mb),
        "",
        "Plot: [load-clients.png](load-clients.png).",
    ]
    return lines, {"state_mb": state_mb, "runs": results, "flat": flat}


RSS_NOISE_MB = 64  # peak RSS of the same server varies by tens of MB from run to run (heap, evaluation)


def memory_answer(growth: float, held: float, results: list[dict], state_mb: float) -> str:
    """Reads the RSS growth against what holding every update of a round would cost."""
    low, high = results[0]["clients"], results[-1]["clients"]
    per_client_kb = growth * 1024 / max(1, high - low)
    measured = (
        f"its peak RSS grew by {growth:.0f} MB from N={low} to N={high} ({per_client_kb:.0f} kB per extra "
        f"client), against {held:.0f} MB ({state_mb * 1024:.0f} kB per client) for holding every update "
        "of a round until it closes."
    )
    if held < RSS_NOISE_MB:
        return f"too few clients to tell apart from run-to-run noise (~{RSS_NOISE_MB} MB): " + measured
    if growth < 0.25 * held + RSS_NOISE_MB:
        return (
            "**yes**: " + measured + " The server folds each accepted update into the round's running sum "
            "as it arrives (mean and clip rules); median and trimmed mean need every update at once (4c)."
        )
    return (
        "**no**: " + measured + " The server holds the round's updates (and, while decoding lags behind the "
        "broker, undecoded payloads) until the round closes; folding each into a running sum as it is "
        "accepted would keep it flat for the mean and clip rules (4c)."
    )


def plot_load(results: list[dict], path: Path) -> None:
    pyplot = matplotlib_pyplot()
    figure, (left, right) = pyplot.subplots(1, 2, figsize=(10, 3.8), dpi=100)
    clients = [item["clients"] for item in results]
    left.plot(clients, [item["updates_per_s"] for item in results], marker="o")
    left.set_ylabel("updates aggregated per second")
    right.plot(clients, [item["server_rss_mb"] for item in results], marker="o")
    right.set_ylabel("server peak RSS (MB)")
    for axes in (left, right):
        axes.set_xscale("log")
        axes.set_xlabel("clients N")
        axes.grid(alpha=0.3)
    figure.suptitle("server against N light clients (MNIST discriminator updates)")
    figure.tight_layout()
    figure.savefig(path)
    pyplot.close(figure)
