"""The `edgegan` command: one thin command per user task. Each parses its flags into settings objects and
makes one call into the package; errors become one-line `error: ...` messages.

Where each command lives: simulate.py (`simulate`); processes.py (`server`, `device`, `aggregator`);
fleet.py (`run`); broker.py (`broker ...`, `certs`); watch.py (`status`, `link-proxy`); outputs.py (`plot`,
`sample`, `evaluate`, `export`, `train-classifier`); configshow.py (`config show`). Options several
commands share are declared once in options.py, and the helpers they share (fail, report, logging, broker
login) in common.py. child.py is no command: it is the entry of `edgegan run`'s child processes.
"""

from __future__ import annotations

import typer

from edgegan import __version__
from edgegan.cli.broker import broker_app, certs
from edgegan.cli.common import fail_for_missing_extra
from edgegan.cli.configshow import config_app
from edgegan.cli.fleet import run
from edgegan.cli.outputs import evaluate, export, plot, sample, train_classifier
from edgegan.cli.processes import aggregator, device, server
from edgegan.cli.simulate import simulate
from edgegan.cli.watch import link_proxy, status

app = typer.Typer(
    help="EdgeGAN: train one GAN across many edge devices whose data never leaves them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def version_callback(value: bool) -> None:
    if value:
        print(f"edgegan {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(
        False, "--version", callback=version_callback, is_eager=True, help="Print the version."
    ),
) -> None:
    """EdgeGAN: train one GAN across many edge devices whose data never leaves them."""


# In the order `edgegan --help` lists them.
app.command()(simulate)
app.command("train-classifier")(train_classifier)
app.command()(server)
app.command()(device)
app.command()(aggregator)
app.add_typer(broker_app, name="broker")
app.command()(certs)
app.command()(run)
app.command()(status)
app.add_typer(config_app, name="config")
app.command("link-proxy")(link_proxy)
app.command()(plot)
app.command()(sample)
app.command()(evaluate)
app.command()(export)



def entry() -> None:
    """The `edgegan` console script: `app`, with a package of an extra this install lacks as one line."""
    try:
        app()
    except ModuleNotFoundError as error:
        fail_for_missing_extra(error)


__all__ = ["app", "entry"]
