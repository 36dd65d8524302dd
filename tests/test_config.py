"""`--config FILE` on every command: file < environment < command line, errors that name key, file and
line, no secrets in files or on screen, and the shipped example files loading as the commands load them."""

import json
import re
from pathlib import Path

import pytest
from typer.main import get_command
from typer.testing import CliRunner

from edgegan.cli import app
from edgegan.configfile import option_keys, walk_commands

ROOT = Path(__file__).resolve().parent.parent
runner = CliRunner()


def show(*args: str, env: dict | None = None) -> dict[str, tuple[str, str]]:
    """`edgegan config show ARGS` as {option: (value, source)}."""
    result = runner.invoke(app, ["config", "show", *args], env={"COLUMNS": "250", **(env or {})})
    assert result.exit_code == 0, result.output
    rows = {}
    for line in result.stdout.splitlines():
        cells = [cell.strip() for cell in line.strip("│ ").split("│")]
        if len(cells) == 3 and (cells[0].startswith("--") or cells[0].startswith("$")):
            rows[cells[0]] = (cells[1], cells[2])
    assert rows, result.stdout
    return rows


def error_of(*args: str, env: dict | None = None) -> str:
    """The one error line of a command that must fail with exit code 2."""
    result = runner.invoke(app, list(args), env=env)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_a_value_comes_from_the_file_unless_the_environment_or_the_command_line_gives_it(tmp_path):
    config = write(tmp_path / "server.toml", '[server]\nlog_level = "debug"\nrounds = 7\n')
    rows = show("server", "--config", str(config))
    assert rows["--log-level"] == ("debug", f"config file {config}")
    assert rows["--rounds"] == ("7", f"config file {config}")
    assert rows["--seed"] == ("0", "default")
    environment = {"EDGEGAN_LOG_LEVEL": "warning"}
    assert show("server", "--config", str(config), env=environment)["--log-level"] == (
        "warning",
        "environment",
    )
    rows = show("server", "--config", str(config), "--log-level", "error", "--rounds", "9", env=environment)
    assert rows["--log-level"] == ("error", "command line") and rows["--rounds"] == ("9", "command line")
    assert rows["--config"] == (str(config), "command line")


def test_a_command_runs_with_the_files_values_and_its_own_flags_over_them(tmp_path):
    out = tmp_path / "run"
    config = write(
        tmp_path / "sim.toml",
        f'# shared by every command that has these flags\nseed = 3\n\n[simulate]\nalgo = "parallel"\n'
        f'dataset = "ring8"\nrounds = 4\neval-every = 2\ndevice_speeds = [1, 1, 1, 0.5]\nout = "{out}"\n',
    )
    result = runner.invoke(app, ["simulate", "--config", str(config), "--rounds", "2"])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["algo"], summary["dataset"], summary["seed"], summary["rounds"]) == (
        "parallel",
        "ring8",
        3,
        2,
    )


def test_keys_are_the_flags_names_with_dashes_or_underscores_or_the_parameter_name(tmp_path):
    for text in ('run = "a"\n', 'run_name = "a"\n', '[device]\nrun = "a"\n'):
        config = write(tmp_path / "device.toml", text)
        rows = show("device", "--config", str(config), "--index", "0", "--of", "1")
        assert rows["--run"][0] == "a", text
    config = write(tmp_path / "server.toml", "[server]\ndeadline-s = 5\nmin_devices = 2\nquorum = 3\n")
    rows = show("server", "--config", str(config))
    assert rows["--deadline-s"][0] == "5.0" and rows["--min-devices"][0] == "2"
    # Paths to files and folders of secrets are not secrets: a shared key that another command takes.
    config = write(tmp_path / "run.toml", 'device_secrets = "/etc/edgegan/secrets"\n[run]\ndevices = 2\n')
    assert show("run", "--config", str(config))["--device-secrets"][0] == "/etc/edgegan/secrets"
    assert show("device", "--config", str(config), "--index", "0", "--of", "1")["--index"][0] == "0"


def test_a_commands_table_overrides_the_top_level_and_a_group_table_applies_to_its_sub_commands(tmp_path):
    config = write(
        tmp_path / "all.toml",
        'log_level = "warning"\n[broker]\nport = 1999\nlog_level = "error"\n[broker.start]\nport = 2000\n'
        "[server]\nrounds = 5\n",
    )
    rows = show("broker", "start", "--config", str(config))
    assert rows["--port"][0] == "2000" and rows["--log-level"][0] == "error"
    rows = show("server", "--config", str(config))
    assert rows["--log-level"][0] == "warning" and rows["--rounds"][0] == "5"


def test_required_options_can_come_from_the_file(tmp_path):
    config = write(tmp_path / "pi.toml", "[device]\nindex = 2\nof = 4\nid = 'pi-2'\n")
    rows = show("device", "--config", str(config))
    assert rows["--index"] == ("2", f"config file {config}") and rows["--of"][0] == "4"
    assert "Missing option '--index'" in error_of("config", "show", "device")


@pytest.mark.parametrize(
    "text,line,named",
    [
        ('[device]\nindex = 0\nof = 1\nbrokr = "mqtt://x"\n', 4, ["unknown key 'brokr'", "edgegan device",
                                                                   "did you mean 'broker'"]),
        ('[device]\nindex = "zero"\nof = 1\n', 2, ["key 'index'", "integer"]),
        ('seed = 0\n\n[devise]\nindex = 0\n', 3, ["unknown table [devise]", "device"]),
        ('nonsense = 1\n', 1, ["unknown key 'nonsense'", "no edgegan command takes it"]),
        ('[broker.stat]\nport = 1\n', 1, ["unknown table [broker.stat]", "broker.start"]),
        ('[device]\nindex = 0\nof = 1\npassword = "hunter2"\n', 4, ["'password' is a secret", "password_file",
                                                                    "EDGEGAN_PASSWORD"]),
        ('token = "abc"\n', 1, ["'token' is a secret"]),
    ],
)  # fmt: skip
def test_a_bad_file_is_one_error_line_naming_the_key_the_file_and_the_line(tmp_path, text, line, named):
    config = write(tmp_path / "bad.toml", text)
    for command in (["device"], ["config", "show", "device"]):
        message = error_of(*command, "--config", str(config))
        assert f"{config}:{line}:" in message, message
        for part in named:
            assert part in message, message
        assert "hunter2" not in message


@pytest.mark.parametrize(
    "command,text,line,named",
    [
        ("run", "[run]\ndevices = 2\nrounds = true\n", 3, ["key 'rounds'", "integer >= 0", "got true"]),
        ("server", "rounds = 99999999999999999999\n", 1, ["key 'rounds'", "1,000,000,000",
                                                            "got 99999999999999999999"]),
        ("server", "[server]\ndeadline_s = nan\n", 2, ["key 'deadline_s'", "number >= 0", "got nan"]),
        ("server", "[server]\nresume = 1\n", 2, ["key 'resume'", "true or false", "got 1"]),
        ("device", "[device]\nindex = -1\nof = 1\n", 2, ["key 'index'", "integer >= 0", "got -1"]),
        ("server", "[server]\nmax_update_norm = \"foo\"\n", 2, ["key 'max_update_norm'", "must be auto",
                                                               'got "foo"']),
        ("run", "max_update_norm = -1\n", 1, ["key 'max_update_norm'", "must be auto", "got -1"]),
    ],
)  # fmt: skip
def test_a_value_of_the_wrong_type_or_out_of_range_is_one_line_naming_key_and_line(
    tmp_path, command, text, line, named
):
    config = write(tmp_path / f"{command}.toml", text)
    message = error_of(command, "--config", str(config))
    assert f"{config}:{line}:" in message, message
    for part in named:
        assert part in message, message


def test_every_numeric_and_boolean_key_of_every_command_is_checked_by_type(tmp_path):
    from edgegan.configfile import ConfigFileError, Context, load_defaults, value_kind

    root = get_command(app)
    checked = 0
    for name, command in walk_commands(root):
        if name.startswith("config") or getattr(command, "commands", None):
            continue
        context, group = Context(root, info_name="edgegan"), root
        for part in name.split("."):  # the command's context, below its group's (broker start ...)
            group = group.commands[part]
            context = Context(group, info_name=part, parent=context)
        for key, param in option_keys(command.params).items():
            kind = value_kind(param)
            if kind not in (bool, int, float) or key != param.name:
                continue
            path = tmp_path / f"{name}-{key}.toml"
            bad = '"yes"' if kind is bool else "true"
            path.write_text(f"[{name}]\n{key} = {bad}\n")
            with pytest.raises(ConfigFileError, match=f":2: key '{key}'"):
                load_defaults(path, context)
            checked += 1
    assert checked >= 40  # every integer, number and flag of every command


def test_the_update_bound_in_a_file_is_auto_or_a_number(tmp_path):
    for text, shown in (('max_update_norm = "auto"\n', "auto"), ("max_update_norm = 5\n", "5")):
        config = write(tmp_path / "server.toml", text)
        rows = show("server", "--config", str(config))
        assert rows["--max-update-norm"] == (shown, f"config file {config}")


def test_a_file_that_is_not_toml_or_not_there_is_an_error_too(tmp_path):
    config = write(tmp_path / "broken.toml", "[device\nindex = 0\n")
    assert re.search(r"broken\.toml: not valid TOML: .*line 1", error_of("device", "--config", str(config)))
    assert "cannot read --config" in error_of("device", "--config", str(tmp_path / "missing.toml"))


def test_show_masks_the_password_and_names_where_it_comes_from(tmp_path):
    secret = "correct-horse-battery-staple"
    config = write(
        tmp_path / "pi.toml", f"[device]\nindex = 0\nof = 1\npassword_file = '{tmp_path}/pi.password'\n"
    )
    result = runner.invoke(app, ["config", "show", "device", "--config", str(config), "--username", "pi-0"],
                           env={"EDGEGAN_PASSWORD": secret, "COLUMNS": "250"})  # fmt: skip
    assert result.exit_code == 0 and secret not in result.output
    rows = show("device", "--config", str(config), env={"EDGEGAN_PASSWORD": secret})
    assert rows["$EDGEGAN_PASSWORD"] == ("***", "environment")
    assert rows["--password-file"] == (f"{tmp_path}/pi.password", f"config file {config}")
    assert (
        show("device", "--config", str(config), env={"EDGEGAN_PASSWORD": ""})["$EDGEGAN_PASSWORD"][1]
        == "not set"
    )


@pytest.mark.parametrize(
    "command,example", [("device", "devices/device.toml"), ("server", "server/server.toml")]
)
def test_the_shipped_example_files_load_as_the_commands_load_them(command, example):
    path = ROOT / example
    rows = show(command, "--config", str(path))
    from_file = {option: value for option, (value, source) in rows.items() if source == f"config file {path}"}
    assert from_file["--run"] == "demo" and from_file["--log-format"] == "json"
    assert from_file["--password-file"].startswith("/etc/edgegan/")
    if command == "device":
        assert from_file["--index"] == "0" and from_file["--of"] == "4" and from_file["--username"] == "pi-0"
    else:
        assert from_file["--rounds"] == "1500" and from_file["--quorum"] == "3"


def test_every_command_with_options_takes_a_config_file_and_no_two_options_share_a_key():
    for name, command in walk_commands(get_command(app)):
        options = [param for param in command.params if param.param_type_name == "option"]
        if name.startswith("config") or getattr(command, "commands", None) and name != "broker":
            continue
        if [param for param in options if param.name != "help"]:
            assert any("--config" in param.opts for param in options), name
        keys = option_keys(command.params)
        for param in set(keys.values()):
            long_flags = [flag[2:].replace("-", "_") for flag in param.opts if flag.startswith("--")]
            assert all(keys[flag] is param for flag in long_flags), (name, param.name)


def test_grid25_has_its_own_recipe_over_the_2d_defaults_and_flags_still_win():
    from edgegan.config import default_help, resolve_train

    ring8, grid25 = resolve_train("ring8", {}), resolve_train("grid25", {})
    assert (grid25.batch_size, grid25.g_batch_size, grid25.gp_weight, grid25.g_lr) == (128, 512, 1.0, 1e-3)
    assert (ring8.batch_size, ring8.g_batch_size, ring8.gp_weight, ring8.g_lr) == (32, 128, 0.1, 1e-4)
    assert grid25.loss == ring8.loss and grid25.device_lr == ring8.device_lr  # the rest is the 2-D recipe
    assert resolve_train("grid25", {"batch_size": 16, "g_lr": None}).batch_size == 16
    assert resolve_train("grid25", {"batch_size": 16, "g_lr": None}).g_lr == 1e-3
    assert default_help("batch_size", True) == "[default: 32 for 2-D data, 128 for grid25, 32 for images]"


def test_the_parallel_schedule_on_images_halves_the_generators_rate_and_every_path_takes_it(tmp_path):
    """With the serial image recipe's G Adam 1e-3 the parallel schedule diverged on MNIST (round ~85)."""
    import json as json_module

    from edgegan.config import resolve_train
    from edgegan.runsetup import resolve_setup

    assert resolve_train("mnist", {}).g_lr == 1e-3
    assert resolve_train("mnist", {}, schedule="parallel").g_lr == 5e-4
    assert resolve_train("mnist", {"g_lr": 2e-4}, schedule="parallel").g_lr == 2e-4  # a flag still wins
    assert resolve_train("ring8", {}, schedule="parallel") == resolve_train("ring8", {})  # 2-D unchanged
    setup = resolve_setup(
        dataset="mnist", devices=2, partition="iid", seed=0, out=tmp_path, schedule="parallel"
    )
    assert setup.train.g_lr == 5e-4
    out = tmp_path / "sim"
    command = ["simulate", "--algo", "parallel", "--dataset", "mnist", "--devices", "2", "--rounds", "0"]
    result = CliRunner().invoke(app, [*command, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert json_module.loads((out / "summary.json").read_text())["train"]["g_lr"] == 5e-4


def test_for_images_the_server_draws_the_fakes_unless_a_flag_or_the_algorithm_says_otherwise(tmp_path):
    """docs/algorithms.md, "Who draws the fakes": the same numbers, a tenth of the bytes down on MNIST."""
    import json as json_module

    from edgegan.config import default_help, resolve_fakes

    assert resolve_fakes("mnist", "serial", None) == resolve_fakes("mnist", "sync", None) == "server"
    assert resolve_fakes("mnist", "parallel", None) == "server"
    assert resolve_fakes("ring8", "serial", None) == "device"  # G is 5.6 kB: nothing to save
    assert all(resolve_fakes("mnist", algo, None) == "device" for algo in ("mdgan", "fedgan", "central"))
    assert resolve_fakes("mnist", "serial", "device") == "device"  # a flag still wins
    assert default_help("fakes") == "[default: device for 2-D data, server for images]"
    for algo, fakes in (("serial", "server"), ("mdgan", "device")):
        out = tmp_path / algo
        command = ["simulate", "--algo", algo, "--dataset", "mnist", "--devices", "2", "--rounds", "0"]
        result = CliRunner().invoke(app, [*command, "--width", "8", "--out", str(out)])
        assert result.exit_code == 0, result.output
        assert json_module.loads((out / "summary.json").read_text())["fakes"] == fakes
