"""A password guesser is locked out (edgegan/runtime/loginthrottle.py): the policy on a fake clock, and the
embedded broker refusing an address after too many wrong passwords while another address logs in."""

import paho.mqtt.client as mqtt
import pytest
from test_broker_security import config, embedded  # noqa: F401 - fixtures: logins, the embedded broker

from edgegan.runtime.loginthrottle import MAX_FAILURES, LoginThrottle


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_too_many_wrong_logins_in_the_window_lock_an_address_out_until_the_lockout_ends():
    clock = Clock()
    throttle = LoginThrottle(max_failures=3, window_s=10, lockout_s=30, clock=clock)
    assert not throttle.failed("10.0.0.1") and not throttle.failed("10.0.0.1")
    clock.now = 11  # the first two fell out of the window
    assert not throttle.failed("10.0.0.1") and not throttle.locked("10.0.0.1")
    assert not throttle.failed("10.0.0.1")
    assert throttle.failed("10.0.0.1")  # three within 10 s
    assert throttle.locked("10.0.0.1") and not throttle.locked("10.0.0.2")
    clock.now = 11 + 29.9
    assert throttle.locked("10.0.0.1") and throttle.refused == 2
    clock.now = 11 + 30
    assert not throttle.locked("10.0.0.1")


def test_a_right_login_forgets_the_wrong_ones_and_the_table_stays_bounded():
    throttle = LoginThrottle(max_failures=2, max_addresses=3, clock=Clock())
    throttle.failed("a")
    throttle.succeeded("a")
    assert not throttle.failed("a")  # counting starts again
    for address in ("b", "c", "d", "e"):
        throttle.failed(address)
    assert len(throttle.failures) == 3 and "a" not in throttle.failures  # the oldest forgotten first
    with pytest.raises(ValueError):
        LoginThrottle(max_failures=0)


def connect(port: int, username: str, password: str, source: str) -> int:
    """The CONNACK's reason code of one login from the loopback address `source` (0: accepted)."""
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"throttle-{source}-{password[:4]}")
    client.username_pw_set(username, password)
    codes = []
    client.on_connect = lambda _client, _data, _flags, code, _props: codes.append(code.value)
    client.connect("127.0.0.1", port, bind_address=source)
    for _ in range(50):
        client.loop(timeout=0.1)
        if codes:
            break
    client.disconnect()
    assert codes, "no CONNACK"
    return codes[0]


def test_the_embedded_broker_locks_out_a_guessing_address_and_not_the_others(embedded, config):  # noqa: F811
    port, right = embedded.plain_port, config.secret("device-0")
    assert connect(port, "device-0", right, "127.0.0.2") == 0
    for attempt in range(MAX_FAILURES):
        assert connect(port, "device-0", f"guess-{attempt}", "127.0.0.2") != 0
    assert connect(port, "device-0", right, "127.0.0.2") != 0  # locked out: even the right password
    assert connect(port, "device-0", right, "127.0.0.3") == 0  # another address is not
    embedded.process.terminate()
    log = embedded.process.communicate(timeout=10)[0].decode()
    assert "locked out 127.0.0.2" in log and "refused a login from 127.0.0.2" in log
