import pytest
import torch

from edgegan.devtools.mosquitto import Mosquitto, mosquitto_installed

# Small models run fastest on one thread, and a shared CI core pair punishes OpenMP's spinning.
torch.set_num_threads(1)


@pytest.fixture
def broker(tmp_path):
    """A Mosquitto from broker/mosquitto-dev.conf as shipped, but for the port of its listener line
    (edgegan.devtools.mosquitto): yields (url, port)."""
    if not mosquitto_installed():
        pytest.skip("mosquitto is not installed")
    with Mosquitto(tmp_path) as running:
        yield running.url, running.port
