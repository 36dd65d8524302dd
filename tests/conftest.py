import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from edgegan.runtime.ports import free_port, wait_for_port

# Small models run fastest on one thread, and a shared CI core pair punishes OpenMP's spinning.
torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parent.parent
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


@pytest.fixture
def broker(tmp_path):
    """A Mosquitto from broker/mosquitto-dev.conf as shipped, but for the port of its listener line:
    yields (url, port)."""
    if not Path(MOSQUITTO).exists():
        pytest.skip("mosquitto is not installed")
    port = free_port()
    shipped = (ROOT / "broker" / "mosquitto-dev.conf").read_text()
    assert "listener 1883 127.0.0.1" in shipped
    config = tmp_path / "mosquitto.conf"
    config.write_text(shipped.replace("listener 1883 127.0.0.1", f"listener {port} 127.0.0.1"))
    config.chmod(0o644)
    tmp_path.chmod(0o755)
    process = subprocess.Popen([MOSQUITTO, "-c", str(config)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        wait_for_port(port)
        yield f"mqtt://127.0.0.1:{port}", port
    finally:
        process.terminate()
        process.wait(timeout=10)
