"""`--config FILE`: one TOML file gives defaults for any command's flags; flags on the command line win.

Layout: top-level keys apply to every command that has such a flag (e.g. `broker`, `run`, `username`);
a table named after the command (`[server]`, `[device]`, `[run]`, `[broker]`, `[broker.start]`...) applies
to that command only and overrides the top level (a sub-command also reads its group's table). A key is a
flag's long name with `-` or `_` (`password_file`, `deadline-s`, `run`) or the option's parameter name
(`run_name`). A key no command knows, a key of the command's own table that it does not take, a table no
command is named after, or a value of the wrong type is an error naming the key, the file and the line.
Secrets never go in the file: password files and the EDGEGAN_PASSWORD environment variable carry them.

The file is loaded by an eager option, so its values become the command's `default_map`: click's own
precedence (command line > environment > file > built-in default) decides, and reports each value's
source for `edgegan config show`.
"""

from __future__ import annotations

import difflib
import math
import os
import re
import tomllib
from collections.abc import Iterator
from pathlib import Path, PurePath
from typing import Any

try:  # typer >= 0.2x carries its own copy of click, which its commands are built on
    from typer._click import Context
    from typer._click.core import Parameter, ParameterSource
    from typer._click.exceptions import BadParameter, ClickException
except ImportError:  # older typer: the click package itself
    from click import BadParameter, ClickException, Context, Parameter
    from click.core import ParameterSource

from edgegan.algorithms.admission import parse_update_bound
from edgegan.runtime.connection import PASSWORD_ENV

CONFIG_FLAG = "--config"
SECRET_WORDS = ("password", "secret", "token")
KEY_LINE = re.compile(r"""^\s*(?:"([^"]+)"|'([^']+)'|([A-Za-z0-9_-]+))\s*=""")
TABLE_LINE = re.compile(r"^\s*\[\s*([A-Za-z0-9_.-]+)\s*\]")
META_KEY = "edgegan.config"
# The largest number a file may give any numeric flag: far beyond any sane run (10**9 rounds, devices,
# seconds), and short of the sizes that overflow a C integer or hang a loop for ever.
NUMBER_LIMIT = 10**9
SOURCE_NAMES = {
    ParameterSource.COMMANDLINE: "command line",
    ParameterSource.ENVIRONMENT: "environment",
    ParameterSource.DEFAULT_MAP: "config file",
    ParameterSource.DEFAULT: "default",
    ParameterSource.PROMPT: "prompt",
}


class ConfigFileError(ValueError):
    """A problem in the file, phrased as `FILE:LINE: key 'x': what is wrong`."""


def key_lines(text: str) -> dict[tuple[str, str], int]:
    """(table, key) -> 1-based line number; the top level is table '' and a table's header is ('', name)."""
    lines: dict[tuple[str, str], int] = {}
    table = ""
    for number, line in enumerate(text.splitlines(), start=1):
        if header := TABLE_LINE.match(line):
            table = header.group(1)
            lines.setdefault(("", table), number)
            continue
        if key := KEY_LINE.match(line):
            lines.setdefault((table, next(group for group in key.groups() if group)), number)
    return lines


def value_kind(param: Parameter) -> type | None:
    """bool, int, float or str: what a file must give for `param` (None: not checked here)."""
    descriptor = getattr(param, "type_descriptor", None)
    if descriptor is not None:  # typer >= 0.2x: the annotation, optional or not
        annotation = descriptor.annotation
        if is_path(param):
            return str
        return annotation if annotation in (bool, int, float, str) else None
    kinds = {"boolean": bool, "integer": int, "float": float, "text": str, "path": str}
    return kinds.get(getattr(getattr(param, "type", None), "name", ""), None)


def as_toml(value: Any) -> str:
    """A value as the file wrote it: `true`, `"text"`, `3`."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    return str(value)


# Keys whose value is text or a number by one parser's rule (e.g. "auto" or a length): checked by it, so
# the file's key and line are named, not only the flag.
VALUE_PARSERS = {"max_update_norm": parse_update_bound}


def value_problem(value: Any, param: Parameter) -> str | None:
    """What is wrong with a file's `value` for `param`, or None. One rule for every key of a kind: booleans
    are true or false (and never numbers), numbers are numbers (not booleans, not text) from 0 to
    NUMBER_LIMIT, integers have no fraction, text is text."""
    if (parse := VALUE_PARSERS.get(param.name or "")) is not None:
        try:
            parse(value)
        except ValueError as error:
            return str(error).split(", got ")[0].replace(f"{param.opts[0]} ", "", 1)
        return None
    kind = value_kind(param)
    if kind is bool:
        return None if isinstance(value, bool) else "must be true or false"
    if kind is str:
        return "must be text, in quotes" if isinstance(value, bool) else None
    if kind is int:
        valid = isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= NUMBER_LIMIT
        return None if valid else f"must be an integer >= 0 and <= {NUMBER_LIMIT:,}"
    if kind is float:
        number = isinstance(value, int | float) and not isinstance(value, bool)
        valid = number and math.isfinite(value) and 0 <= value <= NUMBER_LIMIT
        return None if valid else f"must be a number >= 0 and <= {NUMBER_LIMIT:,}"
    return None


def command_path(ctx: Context) -> str:
    """'broker start' -> 'broker.start': the table a sub-command reads ('' for the root)."""
    names = []
    while ctx.parent is not None:
        names.append(ctx.info_name or "")
        ctx = ctx.parent
    return ".".join(reversed(names))


def is_option(param: Parameter) -> bool:
    return param.param_type_name == "option" and param.name is not None


def is_config_option(param: Parameter) -> bool:
    return CONFIG_FLAG in param.opts


def is_path(param: Parameter) -> bool:
    """A path option (typer >= 0.2x describes its type by annotation, older typer by a click.Path)."""
    descriptor = getattr(param, "type_descriptor", None)
    if descriptor is not None:
        annotation = descriptor.annotation
        return isinstance(annotation, type) and issubclass(annotation, PurePath)
    return type(getattr(param, "type", None)).__name__ == "Path"


def is_secret(name: str, param: Parameter | None) -> bool:
    """Named like a password, and not a path to a file or folder holding one."""
    return any(word in name for word in SECRET_WORDS) and (param is None or not is_path(param))


def option_keys(params: list[Parameter]) -> dict[str, Parameter]:
    """Every spelling of every option as a file key, with `-` turned to `_`: the long flags, then the
    parameter's own name (`run` and `run_name` both mean `--run`)."""
    keys: dict[str, Parameter] = {}
    for param in params:
        if not is_option(param) or is_config_option(param) or param.name == "help":
            continue
        for flag in param.opts:
            if flag.startswith("--"):
                keys.setdefault(flag[2:].replace("-", "_"), param)
        keys.setdefault(param.name, param)
    return keys


def flag_keys(params: list[Parameter]) -> list[str]:
    """The keys users are told about: each option's first long flag, written with `_`."""
    return sorted(
        next((flag[2:].replace("-", "_") for flag in param.opts if flag.startswith("--")), param.name)
        for param in set(option_keys(params).values())
    )


def walk_commands(command: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """('server', command), ('broker', group), ('broker.start', command)...: every command and group."""
    if prefix:
        yield prefix, command
    for name, sub in (getattr(command, "commands", None) or {}).items():
        yield from walk_commands(sub, f"{prefix}.{name}" if prefix else name)


def root_command(ctx: Context) -> Any:
    while ctx.parent is not None:
        ctx = ctx.parent
    return ctx.command


def every_key(ctx: Context) -> dict[str, Parameter]:
    """Every key any command takes, with one of the options it names."""
    keys: dict[str, Parameter] = {}
    for _, command in walk_commands(root_command(ctx)):
        for key, param in option_keys(command.params).items():
            keys.setdefault(key, param)
    return keys


def suggestion(key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key.replace("-", "_"), known, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def load_defaults(path: Path, ctx: Context) -> dict[str, Any]:
    """The file's values for `ctx.command`, keyed by parameter name and checked against its options."""
    try:
        text = path.read_text()
    except OSError as error:
        raise ConfigFileError(f"cannot read --config {path}: {error.strerror}") from None
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ConfigFileError(f"{path}: not valid TOML: {error}") from None
    lines = key_lines(text)
    commands = {
        name: command for name, command in walk_commands(root_command(ctx)) if name.split(".")[0] != "config"
    }
    own = command_path(ctx)
    keys = option_keys(ctx.command.params)
    shown = f"`edgegan {own.replace('.', ' ')}`"

    def where(table: str, key: str) -> str:
        return f"{path}:{lines.get((table, key), lines.get(('', table), 1))}"

    check_tables(document, "", commands, path, lines)
    # The top level, then each enclosing command's table down to the command's own: later ones win.
    parts = own.split(".") if own else []
    tables = [""] + [".".join(parts[: depth + 1]) for depth in range(len(parts))]
    known_everywhere = every_key(ctx)
    chosen: dict[str, tuple[Any, str, str]] = {}  # parameter name -> (value, table, key as written)
    for table in tables:
        values = lookup(document, table)
        for key, value in values.items():
            if isinstance(value, dict):
                continue  # a table: checked by check_tables
            name = key.replace("-", "_")
            param = keys.get(name)
            if is_secret(name, param or known_everywhere.get(name)):
                raise ConfigFileError(
                    f"{where(table, key)}: key {key!r} is a secret and never goes in a file: use "
                    f"password_file = FILE or ${PASSWORD_ENV}"
                )
            if param is None:
                if table != own and name in known_everywhere:
                    continue  # a shared key (or a group's) that another command takes
                if table == "":
                    raise ConfigFileError(
                        f"{where(table, key)}: unknown key {key!r}: no edgegan command takes it"
                        + suggestion(key, sorted(known_everywhere))
                    )
                raise ConfigFileError(
                    f"{where(table, key)}: unknown key {key!r} for `edgegan {table.replace('.', ' ')}`"
                    + suggestion(key, flag_keys(ctx.command.params))
                    + f"; `edgegan {table.replace('.', ' ')} --help` lists its flags"
                )
            chosen[param.name] = (value, table, key)
    defaults = {}
    for name, (value, table, key) in chosen.items():
        param = next(param for param in ctx.command.params if param.name == name)
        if (problem := value_problem(value, param)) is not None and not isinstance(value, list):
            raise ConfigFileError(
                f"{where(table, key)}: key {key!r} of {shown} {problem}, got {as_toml(value)}"
            )
        if isinstance(value, list) and not param.multiple:
            value = ",".join(str(item) for item in value)  # device_speeds = [1, 1, 0.25] -> "1,1,0.25"
        try:
            param.process_value(ctx, value)
        except BadParameter as error:
            raise ConfigFileError(f"{where(table, key)}: key {key!r} of {shown}: {error.message}") from None
        defaults[name] = value
    return defaults


def check_tables(document: dict, prefix: str, commands: dict[str, Any], path: Path, lines: dict) -> None:
    """Every table must be named after a command (`[server]`) or a sub-command (`[broker.start]`)."""
    for key, value in document.items():
        if not isinstance(value, dict):
            continue
        name = f"{prefix}.{key}" if prefix else key
        if name not in commands:
            known = sorted(command for command in commands if command.count(".") == name.count("."))
            raise ConfigFileError(
                f"{path}:{lines.get(('', name), lines.get((prefix, key), 1))}: unknown table [{name}]; "
                f"tables are named after commands: {', '.join(known)}"
            )
        check_tables(value, name, commands, path, lines)


def lookup(document: dict, dotted: str) -> dict:
    value: Any = document
    for part in dotted.split(".") if dotted else []:
        value = value.get(part, {}) if isinstance(value, dict) else {}
    return value if isinstance(value, dict) else {}


def apply_config(ctx: Context, value: Path | None) -> Path | None:
    """What the eager `--config` option does: the file's values become the command's defaults."""
    if value is None or ctx.resilient_parsing:
        return value
    ctx.default_map = {**(ctx.default_map or {}), **load_defaults(Path(value), ctx)}
    ctx.meta[META_KEY] = Path(value)
    return value


def parse_command(root: Context, command: str, args: list[str]) -> Context:
    """The context `edgegan COMMAND ARGS...` would run with: options parsed (and --config applied), the
    command not run. `broker start ...` descends into the group. A bad command or flag is a ValueError."""
    words, parent, target = [command], root, getattr(root.command, "commands", {}).get(command)
    if target is None or command == "config":
        known = ", ".join(name for name in root.command.commands if name != "config")
        raise ValueError(f"unknown command {command!r}; commands: {known}")
    args = list(args)
    while getattr(target, "commands", None) and args and args[0] in target.commands:
        parent = type(root)(target, info_name=words[-1], parent=parent)
        words.append(args.pop(0))
        target = target.commands[words[-1]]
    try:
        return target.make_context(words[-1], args, parent=parent)
    except ClickException as error:
        raise ValueError(f"edgegan {' '.join(words)}: {error.format_message()}") from None


def effective_settings(ctx: Context) -> list[tuple[str, Any, str]]:
    """(flag, value, where it came from) for every option of a parsed command; secrets masked."""
    config = ctx.meta.get(META_KEY)
    rows = []
    for param in ctx.command.params:
        if not is_option(param) or param.name == "help":
            continue
        value = ctx.params.get(param.name)
        source = SOURCE_NAMES.get(ctx.get_parameter_source(param.name), "default")
        if source == "config file" and config is not None:
            source = f"config file {config}"
        if is_secret(param.name, param) and value:
            value = "***"
        rows.append((param.opts[0], value, source))
    if "username" in ctx.params:
        # The password itself is never an option: say only whether the environment holds one.
        rows.append((f"${PASSWORD_ENV}", "***" if os.environ.get(PASSWORD_ENV) else None,
                     "environment" if os.environ.get(PASSWORD_ENV) else "not set"))  # fmt: skip
    return rows
