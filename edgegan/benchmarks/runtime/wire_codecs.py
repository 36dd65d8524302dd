"""Section 3: the wire codecs' bytes and encode/decode times on real MNIST envelopes, and the final quality
of a short training with each."""

from __future__ import annotations

import json
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from edgegan.benchmarks.runtime.harness import Sizes, edgegan_command, run_measured, time_median
from edgegan.benchmarks.runtime.report import table, verdict


def mnist_messages() -> tuple[dict, dict, dict]:
    """(global G+D tensors, an update's full D state, an update's change from the global D) of the MNIST
    DCGAN after one real local step, with the documented defaults."""
    import torch

    from edgegan import wire
    from edgegan.algorithms.proposed import GlobalGan, LocalDiscriminator
    from edgegan.algorithms.staleness import difference
    from edgegan.config import resolve_run, resolve_train
    from edgegan.data import load_dataset
    from edgegan.models import ModelSpec

    torch.set_num_threads(1)
    dataset = load_dataset("mnist")
    spec = ModelSpec(
        dataset.sample_shape, resolve_run("mnist", "latent_dim", None), resolve_run("mnist", "width", None)
    )
    train = resolve_train("mnist", {})
    server = GlobalGan(spec, train, 0)
    generator_state, discriminator_state = server.snapshot()
    device = LocalDiscriminator(spec=spec, cfg=train, data=dataset.x[:2500], device_index=0, seed=0)
    update = device.update(0, generator_state, discriminator_state)
    published = wire.global_tensors(generator_state, discriminator_state)
    change = difference(update.state, discriminator_state)
    return published, wire.discriminator_tensors(update.state), wire.discriminator_tensors(change)


def section_codecs(sizes: Sizes, work: Path) -> tuple[list[str], dict]:
    import torch

    from edgegan import wire
    from edgegan.algorithms.sparsify import TOPK_DENSITY, top_k

    published, full_update, change = mnist_messages()
    micro = {}
    decoded_by_codec = {}
    for codec in wire.CODECS:
        # As a device sends it: fp32 carries its D, a lossy codec the change from the global D, a sparse
        # one the top-k of that change (its first round: no residual yet).
        update_tensors = change if wire.is_lossy(codec) else full_update
        if wire.is_sparse(codec):
            update_tensors = {name: top_k(tensor, TOPK_DENSITY) for name, tensor in change.items()}
        update = wire.Envelope(
            kind="update", run="bench", round=1, base_round=1, device="device-0", samples=2500, codec=codec,
            tensors=update_tensors, loss=0.0, delta=wire.is_lossy(codec),
        )  # fmt: skip
        global_model = wire.Envelope(
            kind="global", run="bench", round=1, base_round=1, device="server", samples=0, codec=codec,
            tensors=published,
        )  # fmt: skip
        update_bytes, global_bytes = wire.encode(update), wire.encode(global_model)
        decoded_by_codec[codec] = wire.decode(update_bytes).tensors
        micro[codec] = {
            "update_bytes": len(update_bytes),
            "global_bytes": len(global_bytes),
            "update_encode_ms": time_median(lambda update=update: wire.encode(update), sizes.codec_repeats)
            * 1e3,
            "update_decode_ms": time_median(lambda data=update_bytes: wire.decode(data), sizes.codec_repeats)
            * 1e3,
            "global_encode_ms": time_median(
                lambda g=global_model: wire.encode(g), max(3, sizes.codec_repeats // 10)
            )
            * 1e3,
            "global_decode_ms": time_median(
                lambda data=global_bytes: wire.decode(data), max(3, sizes.codec_repeats // 10)
            )
            * 1e3,
        }
    lossless = all(
        all(
            torch.equal(decoded_by_codec[f"{base}+zstd"][name], tensor)
            for name, tensor in decoded_by_codec[base].items()
        )
        for base in wire.BASE_CODECS
    )

    def train(codec: str) -> dict:
        out = work / f"codec-{codec}"
        shutil.rmtree(out, ignore_errors=True)
        command = edgegan_command(
            "simulate",
            "--algo",
            "serial",
            "--dataset",
            "mnist",
            "--devices",
            "4",
            "--rounds",
            str(sizes.codec_rounds),
            "--eval-every",
            str(sizes.codec_rounds),
            "--eval-samples",
            str(sizes.eval_samples),
            "--codec",
            codec,
            "--out",
            str(out),
        )
        print(f"  codecs: training with {codec}", file=sys.stderr, flush=True)
        measured = run_measured(command, work / f"codec-{codec}.log", 60 * 60)
        if measured.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed; see {work}/codec-{codec}.log")
        return json.loads((out / "summary.json").read_text())

    # Two trainings at a time, one torch thread each; fid and bytes are deterministic, times not reported.
    with ThreadPoolExecutor(max_workers=2) as pool:
        trained = [codec for codec in wire.CODECS if codec in sizes.codec_trained]
        summaries = dict(zip(trained, pool.map(train, trained), strict=True))
    base = micro["fp32"]
    rows = []
    for codec in wire.CODECS:
        item, summary = micro[codec], summaries.get(codec, {})
        fid = (summary.get("final") or {}).get("fid")
        item["final_fid"], item["final_classes"] = fid, (summary.get("final") or {}).get("classes")
        rows.append(
            [
                codec,
                f"{item['update_bytes']:,}",
                f"{base['update_bytes'] / item['update_bytes']:.2f}x",
                f"{item['global_bytes']:,}",
                f"{base['global_bytes'] / item['global_bytes']:.2f}x",
                f"{item['update_encode_ms']:.2f}",
                f"{item['update_decode_ms']:.2f}",
                f"{item['global_encode_ms']:.1f}",
                f"{item['global_decode_ms']:.1f}",
                "—" if fid is None else f"{fid:.1f}",
                "—" if item["final_classes"] is None else item["final_classes"],
            ]
        )
    ratio = base["update_bytes"] / micro["int8+zstd"]["update_bytes"]
    global_ratio = base["global_bytes"] / micro["int8+zstd"]["global_bytes"]
    lines = [
        "Bytes and encode/decode times of real envelopes (wire.encode / wire.decode, real msgpack and zstd) "
        "for the MNIST DCGAN with the documented defaults, after one real local step: an *update* is one "
        "device's discriminator (fp32: its parameters; lossy codecs: its change from the global one, as "
        "devices send it), the *global* message is G + D. Times are medians of "
        f"{sizes.codec_repeats} (update) and {max(3, sizes.codec_repeats // 10)} (global) calls on one "
        f"core. *Final fid*: `edgegan simulate --algo serial --dataset mnist --devices 4 --rounds "
        f"{sizes.codec_rounds} --eval-samples {sizes.eval_samples} --codec CODEC` (the 1500-round version "
        "is `scripts/bench-codecs`, in docs/benchmarks.md).",
        "",
        *table(
            [
                "codec",
                "update bytes",
                "fp32 / this",
                "global bytes",
                "fp32 / this",
                "update encode ms",
                "update decode ms",
                "global encode ms",
                "global decode ms",
                "final fid",
                "classes",
            ],
            rows,
        ),
        "",
        "zstd is lossless on top of each base codec: decoded tensors identical — "
        f"{'yes' if lossless else 'NO'}. "
        f"Target: int8+zstd at least 3.5x smaller than fp32 — {verdict(ratio >= 3.5)} ({ratio:.2f}x for an "
        f"update, {global_ratio:.2f}x for the global model).",
    ]
    return lines, {"codecs": micro, "lossless_zstd": lossless, "int8_zstd_ratio": ratio}
