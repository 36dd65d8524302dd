"""`edgegan config show`: the configuration a command would run with, and where each value comes from."""

from __future__ import annotations

import typer
from rich.console import Console

from edgegan.cli.common import fail

config_app = typer.Typer(
    help="The configuration a command would run with.", add_completion=False, rich_markup_mode=None
)


@config_app.command(
    "show",
    # Everything after COMMAND is COMMAND's, --config and --help included.
    context_settings={
        "ignore_unknown_options": True,
        "allow_extra_args": True,
        "allow_interspersed_args": False,
    },
)
def config_show(
    ctx: typer.Context,
    command: str = typer.Argument(
        ...,
        metavar="COMMAND [FLAGS]...",
        help="The command, then its flags as you would give them: device --config pi-0.toml --index 1.",
    ),
) -> None:
    """Print every option of COMMAND with the value it would run with and where that value comes from:
    command line, environment, config file, or default. Passwords are never shown.

    Example: edgegan config show device --config /etc/edgegan/pi-0.toml
    """
    from rich.table import Table

    from edgegan.configfile import command_path, effective_settings, parse_command

    try:
        parsed = parse_command(ctx.find_root(), command, ctx.args)
    except ValueError as error:
        fail(str(error))
    name = command_path(parsed).replace(".", " ")
    table = Table(title=f"edgegan {name}", title_justify="left")
    for column in ("option", "value", "source"):
        table.add_column(column)
    for flag, value, source in effective_settings(parsed):
        table.add_row(flag, "—" if value is None else str(value), source)
    Console(width=max(120, Console().width)).print(table)
