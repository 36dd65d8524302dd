"""`python -m edgegan.cli.child ROLE NAME`: one process of `edgegan run`. The launcher
(edgegan/runtime/launcher.py) writes its job, settings and set-up included, as one JSON document to its
stdin (edgegan/runtime/fleetplan.py: ChildJob); ROLE and NAME are there only for `ps`. It then runs what
`edgegan server`, `device` and `aggregator` run once they have built their settings from flags."""

from __future__ import annotations

import sys

import typer

from edgegan.cli.common import setup_logging
from edgegan.cli.processes import aggregate_and_report, serve_and_report, train_device_and_report
from edgegan.runtime.fleetplan import ChildJob

THREADS = 1  # torch threads per child: a fleet on one machine shares its cores


def run_job(job: ChildJob) -> None:
    setup_logging(job.log_level, job.log_format)
    if job.role == "server":
        serve_and_report(job.settings, job.setup, resume=False, threads=THREADS)
    elif job.role == "device":
        train_device_and_report(job.settings, job.setup, job.index, threads=THREADS, data=job.data)
    else:
        setup = job.setup
        aggregate_and_report(
            job.settings, setup.dataset, setup.data_dir, setup.width, setup.latent_dim, threads=THREADS,
            d_width=setup.train.d_width,
        )


def main() -> None:
    job = ChildJob.from_document(sys.stdin.buffer.read())
    try:
        run_job(job)
    except typer.Exit as stop:
        sys.exit(stop.exit_code)


if __name__ == "__main__":
    main()
