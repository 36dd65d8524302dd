"""Broker identities in Mosquitto's own file formats: the password file (`name:$7$...` hashes), the ACL
file (`user`, `topic`, `pattern` lines) and the per-identity secret files clients read their password from.

Mosquitto and the embedded broker read the same two files, so one `edgegan broker add-device` serves
both. The rules themselves come from `topics.access_rules()`; this module only reads and writes files.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from edgegan import topics

# mosquitto_passwd's format since 2.0: $7$ITERATIONS$base64(salt)$base64(PBKDF2-HMAC-SHA512). The secrets
# we generate carry 256 random bits, so more iterations than Mosquitto's default would add nothing.
PBKDF2_ITERATIONS = 101
SALT_BYTES = 12
SECRET_BYTES = 32
ACCESS = {"read": {"read"}, "write": {"write"}, "readwrite": {"read", "write"}, "deny": set()}


class CredentialsError(ValueError):
    """A password, secret or ACL file that cannot be used; the message names the file."""


def new_secret() -> str:
    return secrets.token_urlsafe(SECRET_BYTES)


def hash_password(password: str, salt: bytes | None = None, iterations: int = PBKDF2_ITERATIONS) -> str:
    """The `$7$` hash Mosquitto 2.0 expects in its password file."""
    salt = salt if salt is not None else os.urandom(SALT_BYTES)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def verify_password(password: str, hashed: str) -> bool:
    """Checks a password against a `$7$` (PBKDF2-SHA512) or `$6$` (salted SHA-512, Mosquitto 1.x) hash."""
    parts = hashed.split("$")
    try:
        if len(parts) == 5 and parts[1] == "7":
            salt, expected = base64.b64decode(parts[3]), base64.b64decode(parts[4])
            actual = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, int(parts[2]), len(expected))
        elif len(parts) == 4 and parts[1] == "6":
            salt, expected = base64.b64decode(parts[2]), base64.b64decode(parts[3])
            actual = hashlib.sha512(password.encode() + salt).digest()
        else:
            return False
    except ValueError:  # bad base64 or iteration count
        return False
    return hmac.compare_digest(actual, expected)


def read_password_file(path: Path) -> dict[str, str]:
    """name -> hash, from a Mosquitto password file."""
    try:
        lines = path.read_text().splitlines()
    except OSError as error:
        raise CredentialsError(f"cannot read the password file {path}: {error.strerror}") from None
    users = {}
    for line in lines:
        if line.strip() and not line.startswith("#"):
            name, separator, hashed = line.partition(":")
            if not separator:
                raise CredentialsError(f"{path} is not a Mosquitto password file (a line without ':')")
            users[name] = hashed.strip()
    return users


def set_password(path: Path, name: str, password: str) -> bool:
    """Adds `name` to the password file, or replaces its hash; True if it was already there."""
    lines = path.read_text().splitlines() if path.exists() else []
    entry = f"{name}:{hash_password(password)}"
    kept = [line for line in lines if line.partition(":")[0] != name]
    write_keeping_owner(path, "\n".join([*kept, entry]) + "\n")
    return len(kept) != len(lines)


def servers_password_file(path: Path) -> Path:
    """The servers' listener's logins beside the broker's password file (broker/mosquitto.conf: only
    server logins may connect where client ids are free): `passwd` -> `passwd.servers`."""
    return path.with_name(f"{path.name}.servers")


def remove_user(path: Path, name: str) -> bool:
    """Removes `name` from the password file; False if it was not there."""
    lines = path.read_text().splitlines() if path.exists() else []
    kept = [line for line in lines if line.partition(":")[0] != name]
    if len(kept) == len(lines):
        return False
    write_keeping_owner(path, "".join(f"{line}\n" for line in kept))
    return True


def write_keeping_owner(path: Path, text: str) -> None:
    """Replaces `path` atomically. A new file is 0600; an existing one keeps its mode and owner, so a file
    that was handed to the broker's user (`chown mosquitto`) stays readable by the broker."""
    path.parent.mkdir(parents=True, exist_ok=True)
    previous = path.stat() if path.exists() else None
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(handle, "w") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
            if previous is not None:
                os.fchmod(file.fileno(), previous.st_mode & 0o777)
                try:
                    os.fchown(file.fileno(), previous.st_uid, previous.st_gid)
                except PermissionError:
                    pass  # not ours to give away; the mode is kept
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_secret(path: Path, secret: str) -> None:
    """A file only its owner can read (0600), holding one password on one line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(handle, "w") as file:
        os.fchmod(file.fileno(), 0o600)  # an existing file keeps its mode through O_CREAT
        file.write(secret + "\n")


def read_secret(path: Path) -> str:
    """The first line of a password file written by `write_secret` (or by hand)."""
    try:
        lines = path.read_text().splitlines()
    except OSError as error:
        raise CredentialsError(f"cannot read --password-file {path}: {error.strerror}") from None
    if not lines or not lines[0].strip():
        raise CredentialsError(f"--password-file {path} is empty")
    return lines[0].strip()


@dataclass(frozen=True)
class AclRule:
    access: str  # read | write | readwrite | deny
    topic: str  # a topic filter; in patterns %u stands for the username and %c for the client id


@dataclass
class Acl:
    """A Mosquitto ACL file: rules for anonymous clients, per user, and patterns for everyone."""

    anonymous: list[AclRule] = field(default_factory=list)
    users: dict[str, list[AclRule]] = field(default_factory=dict)
    patterns: list[AclRule] = field(default_factory=list)

    def allows(self, username: str | None, client_id: str, topic: str, access: str) -> bool:
        """Mosquitto 2.0's rule: a matching `deny` wins, then any matching rule that grants `access`."""
        rules = list(self.users.get(username, []) if username is not None else self.anonymous)
        for pattern in self.patterns:
            topic_filter = substitute(pattern.topic, username, client_id)
            if topic_filter is not None:
                rules.append(AclRule(pattern.access, topic_filter))
        if any(rule.access == "deny" and filter_matches(rule.topic, topic) for rule in rules):
            return False
        return any(access in ACCESS[rule.access] and filter_matches(rule.topic, topic) for rule in rules)


def substitute(topic_filter: str, username: str | None, client_id: str) -> str | None:
    """%u and %c filled in, or None where the pattern cannot apply (as Mosquitto: no username, or a name
    that would smuggle in a wildcard or a level)."""
    for marker, value in (("%u", username), ("%c", client_id)):
        if marker in topic_filter:
            if not value or any(character in value for character in "+#/"):
                return None
            topic_filter = topic_filter.replace(marker, value)
    return topic_filter


def filter_matches(topic_filter: str, topic: str) -> bool:
    """MQTT topic matching: `+` is one level, `#` the rest (and its parent); wildcards in the first level
    do not match `$` topics."""
    if topic.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False
    wanted, levels = topic_filter.split("/"), topic.split("/")
    for index, level in enumerate(wanted):
        if level == "#":
            return True
        if index >= len(levels) or (level != "+" and level != levels[index]):
            return False
    return len(wanted) == len(levels)


def parse_acl(text: str, source: str = "the ACL file") -> Acl:
    acl = Acl()
    user: str | None = None
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, rest = line.partition(" ")
        rest = rest.strip()
        if keyword == "user":
            if not rest:
                raise CredentialsError(f"{source}, line {number}: 'user' needs a name")
            user = rest
            acl.users.setdefault(user, [])
            continue
        if keyword not in ("topic", "pattern") or not rest:
            raise CredentialsError(f"{source}, line {number}: expected user, topic or pattern: {line!r}")
        access, _, topic_filter = rest.partition(" ")
        if access not in ACCESS or not topic_filter.strip():
            access, topic_filter = "readwrite", rest  # Mosquitto: no access word means readwrite
        rule = AclRule(access, topic_filter.strip())
        if keyword == "pattern":
            acl.patterns.append(rule)
        elif user is None:
            acl.anonymous.append(rule)
        else:
            acl.users[user].append(rule)
    return acl


def read_acl(path: Path) -> Acl:
    try:
        return parse_acl(path.read_text(), str(path))
    except OSError as error:
        raise CredentialsError(f"cannot read the ACL file {path}: {error.strerror}") from None


def server_block(name: str, role: str = "server") -> str:
    """The ACL lines that make `name` a server identity (or, with role `site`, a site broker's bridge)."""
    rules = "".join(f"topic {access} {topic_filter}\n" for access, topic_filter in topics.access_rules(role))
    return f"user {name}\n{rules}"


def device_patterns() -> str:
    return "".join(
        f"pattern {access} {topic_filter}\n" for access, topic_filter in topics.access_rules("device")
    )


def copy_template_acl(acl_path: Path) -> Path | None:
    """A missing ACL file starts as a copy of the shipped `acl` beside it (broker/acl.local from broker/acl),
    so that the commands never edit the tracked template; returns the template copied, or None."""
    template = acl_path.with_name("acl")
    if acl_path.exists() or template == acl_path or not template.is_file():
        return None
    write_keeping_owner(acl_path, template.read_text())
    acl_path.chmod(template.stat().st_mode & 0o777)  # not a secret: the broker's user must read it
    return template


def add_server(acl_path: Path, name: str, role: str = "server") -> bool:
    """Gives `name` the server's rules (or a `site`'s) in the ACL file (creating the file if needed); False
    if it had rules already."""
    if acl_path.exists():
        if name in read_acl(acl_path).users:
            return False
        text = acl_path.read_text()
        separator = "" if not text or text.endswith("\n\n") else ("\n" if text.endswith("\n") else "\n\n")
        write_keeping_owner(acl_path, text + separator + server_block(name, role))
    else:
        header = (
            f"# EdgeGAN broker ACL, written by `edgegan broker add-{role}`; broker/acl explains each line.\n"
        )
        write_keeping_owner(acl_path, f"{header}\n{device_patterns()}\n{server_block(name, role)}")
    return True


def server_identities(acl_path: Path) -> set[str]:
    return set(read_acl(acl_path).users) if acl_path.exists() else set()
