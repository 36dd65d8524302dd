"""A board's install (pyproject's base dependencies, no extras): `edgegan device` trains over a real
Mosquitto with the `server` extra's packages made unimportable, imports nothing outside the base
dependencies, and the commands that need the extra say so in one line."""

import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from small_runs import finish
from test_local_data import write_pngs

from edgegan.data import load_dataset

BOARD = Path(__file__).resolve().parent / "board_python.py"


def on_a_board(*args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(BOARD), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        text=True,
    )


def base_closure() -> set[str]:
    """edgegan's base requirements and everything they require in turn (markers evaluated here), as
    normalised distribution names."""
    def name(text: str) -> str:
        return text.replace("_", "-").replace(".", "-").lower()

    seen, todo = set(), [Requirement(text) for text in metadata.requires("edgegan")]
    while todo:
        requirement = todo.pop()
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue
        if name(requirement.name) in seen:
            continue
        seen.add(name(requirement.name))
        try:
            todo.extend(Requirement(text) for text in metadata.requires(requirement.name) or [])
        except metadata.PackageNotFoundError:
            pass  # an optional platform package not installed here
    return seen


def test_a_device_on_a_base_install_trains_on_its_pngs_and_imports_only_the_base_dependencies(
    broker, tmp_path
):
    from test_runtime_mqtt import edgegan

    url, _ = broker
    run, tiny = "board", ["--dataset", "mnist", "--width", "8", "--latent-dim", "8"]
    write_pngs(tmp_path / "pi", load_dataset("mnist").x[:24])
    server = edgegan(
        "server", "--broker", url, "--run", run, "--devices", "1", "--rounds", "2", "--eval-every", "2",
        "--deadline-s", "60", "--out", str(tmp_path / "server"), "--quality-from", "devices", *tiny,
    )  # fmt: skip
    imports = tmp_path / "imports.txt"
    device = on_a_board(
        "device", "--broker", url, "--run", run, "--id", "pi-0", "--data", str(tmp_path / "pi"),
        env={"EDGEGAN_IMPORTS_TO": str(imports)},
    )  # fmt: skip
    finish(server)
    assert "updates_sent=2" in finish(device)

    closure = base_closure()
    assert not closure & {"torchmetrics", "matplotlib", "amqtt"}, "the server extra leaked into the base"
    owners = metadata.packages_distributions()
    outside = {
        module: owners[module]
        for module in imports.read_text().split()
        if module in owners and module != "edgegan"
        and not any(owner.replace("_", "-").lower() in closure for owner in owners[module])
    }  # fmt: skip
    assert not outside, f"the device imported modules outside its base dependencies: {outside}"


@pytest.mark.parametrize(
    "args",
    [("simulate", "--dataset", "mnist", "--rounds", "2"), ("broker", "start", "--port", "1")],
    ids=["simulate", "embedded-broker"],
)
def test_a_command_that_needs_the_server_extra_says_so_in_one_line_on_a_base_install(tmp_path, args):
    result = subprocess.run(
        [sys.executable, str(BOARD), *args], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and len(lines) == 1, result.stderr[-2000:]
    assert lines[0].startswith("error: ") and lines[0].endswith(
        "which a base install leaves out: pip install 'edgegan[server]'"
    )
