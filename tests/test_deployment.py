"""What deploys each part, checked as far as a machine without a Docker engine or a board allows."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILES = [ROOT / "devices" / "Dockerfile", ROOT / "server" / "Dockerfile"]
COMPOSE_FILES = [ROOT / "docker-compose.yml", ROOT / "broker" / "docker-compose.yml"]
UNITS = [ROOT / "devices" / "edgegan-device@.service", ROOT / "server" / "edgegan-server.service"]
INSTRUCTIONS = {"FROM", "ARG", "ENV", "RUN", "COPY", "WORKDIR", "USER", "ENTRYPOINT", "CMD", "VOLUME",
                "EXPOSE", "LABEL", "HEALTHCHECK", "SHELL", "STOPSIGNAL", "ADD", "ONBUILD"}  # fmt: skip


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with comments dropped and continuation lines joined."""
    logical, current = [], ""
    for line in path.read_text().splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        current += line.rstrip("\\").strip() + " "
        if not line.rstrip().endswith("\\"):
            logical.append(current.strip())
            current = ""
    assert not current, f"{path}: a continuation line runs off the end"
    return [(text.split(maxsplit=1)[0], text.split(maxsplit=1)[1]) for text in logical]


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_dockerfiles_use_known_instructions_and_copy_files_that_exist(path):
    instructions = dockerfile_instructions(path)
    assert {name for name, _ in instructions} <= INSTRUCTIONS
    assert any(name == "FROM" for name, _ in instructions)
    copied = [args.split()[:-1] for name, args in instructions if name == "COPY"]
    assert copied, "the image must contain the package"
    for sources in copied:
        for source in sources:
            assert (ROOT / source).exists(), f"{path} copies {source}, which is not in the repository"
    assert ("USER", "edgegan") in instructions  # never run as root
    entrypoint = dict(instructions)["ENTRYPOINT"]
    assert entrypoint == '["edgegan"]'


def compose_paths(service: dict, compose: Path) -> list[Path]:
    """Host files and folders a service mounts or builds from (named volumes excluded)."""
    paths = []
    for volume in service.get("volumes", []):
        source = volume.split(":")[0]
        if source.startswith((".", "/")):
            paths.append((compose.parent / source).resolve())
    build = service.get("build")
    if build:
        context = compose.parent / build["context"]
        paths += [context.resolve(), (context / build.get("dockerfile", "Dockerfile")).resolve()]
    return paths


@pytest.mark.parametrize("compose", COMPOSE_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_compose_files_parse_and_reference_files_that_exist(compose):
    document = yaml.safe_load(compose.read_text())
    services = document["services"]
    named_volumes = set(document.get("volumes") or {})
    generated = {ROOT / "broker" / "passwd", ROOT / "broker" / "acl.local", ROOT / "broker" / "certs",
                 ROOT / "secrets" / "server.password"}  # fmt: skip
    for name, service in services.items():
        assert "image" in service or "build" in service, name
        for path in compose_paths(service, compose):
            # Logins and certificates are made by `edgegan broker add-*` and `edgegan certs` first.
            assert path.exists() or path in generated, f"{compose.name}: {name} needs {path}"
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if not source.startswith((".", "/")):
                assert source in named_volumes, f"{name} mounts undeclared volume {source}"
        for dependency in service.get("depends_on", {}):
            assert dependency in services
        if "healthcheck" in service:
            assert service["healthcheck"]["test"][0] in ("CMD", "CMD-SHELL")


def test_the_first_try_compose_runs_server_and_devices_on_the_shipped_broker_config():
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    assert services["broker"]["image"] == "eclipse-mosquitto:2"
    devices = [name for name in services if name.startswith("device-")]
    assert len(devices) == 4
    for name in ["server", *devices]:
        command = services[name]["command"]
        # broker/mosquitto.conf: the servers' listener on 8884, the boards' (ids bound to logins) on 8883.
        port = 8884 if name == "server" else 8883
        assert f"mqtts://broker:{port}" in command and "--password-file" in command
    indices = sorted(int(services[name]["command"][services[name]["command"].index("--index") + 1])
                     for name in devices)  # fmt: skip
    assert indices == [0, 1, 2, 3]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_systemd_units_pass_systemd_analyze_verify(unit, tmp_path):
    # The units name the install location; point it at this checkout's edgegan so `verify` can check it.
    edgegan = Path(sys.executable).parent / "edgegan"
    copy = tmp_path / unit.name
    copy.write_text(unit.read_text().replace("/opt/edgegan/venv/bin/edgegan", str(edgegan)))
    result = subprocess.run(["systemd-analyze", "verify", str(copy)], capture_output=True, text=True,
                            timeout=60)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "Unknown key" not in result.stderr and "Unknown section" not in result.stderr, result.stderr


def test_units_restart_on_failure_and_limit_resources():
    for unit in UNITS:
        text = unit.read_text()
        assert re.search(r"^Restart=on-failure$", text, re.M), unit
        assert re.search(r"^MemoryMax=", text, re.M), unit
        assert "--config /etc/edgegan/" in text


def test_the_server_unit_does_not_restart_a_run_that_stopped_itself():
    """Exit code 3 (diverged, or too many updates rejected) would resume into the same failure."""
    text = (ROOT / "server" / "edgegan-server.service").read_text()
    assert re.search(r"^RestartPreventExitStatus=3$", text, re.M)
