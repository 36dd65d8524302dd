"""`edgegan broker` (the embedded broker, and a broker's logins: add-device, add-server, remove) and
`edgegan certs` (a development PKI)."""

from __future__ import annotations

from pathlib import Path

import typer

from edgegan.cli import options as opt
from edgegan.cli.common import console, fail, setup_logging

broker_app = typer.Typer(
    help="The embedded MQTT broker, and the logins of a broker's devices and servers.",
    add_completion=False,
    rich_markup_mode=None,
)

# The embedded broker's options (`broker` and `broker start`).
HOST = typer.Option(
    "127.0.0.1", "--host", help="Interface to listen on; beyond loopback needs --passwd, --acl and TLS."
)
PORT = typer.Option(1883, "--port", help="TCP port.")
PASSWD = typer.Option(
    None, "--passwd", help="Mosquitto password file to check logins against. [default: anonymous, loopback]",
    show_default=False,
)  # fmt: skip
ACL = typer.Option(
    None, "--acl", help="Mosquitto ACL file (broker/acl) that says who may publish and read what."
)
CERT = typer.Option(None, "--tls-cert", help="Serve TLS with this certificate (edgegan certs).")
KEY = typer.Option(None, "--tls-key", help="Private key of --tls-cert.")
CA = typer.Option(None, "--tls-ca", help="Verify client certificates signed by this CA, if sent.")
# The login commands' files.
PASSWD_FILE = typer.Option(
    Path("broker/passwd"), "--passwd", help="The broker's password file (Mosquitto's password_file)."
)
ACL_FILE = typer.Option(
    Path("broker/acl.local"), "--acl",
    help="The broker's ACL file (Mosquitto's acl_file); a missing one starts as a copy of the shipped `acl` "
    "beside it, which is never edited.",
)  # fmt: skip
SECRETS_DIR = typer.Option(
    Path("secrets"), "--secrets-dir",
    help="Where NAME.password (mode 0600) is written; for a device also NAME.update-key (0600) and the "
    "server's device-keys file.",
)


@broker_app.callback(invoke_without_command=True)
def broker(
    context: typer.Context,
    config_file: Path | None = opt.CONFIG,
    host: str = HOST,
    port: int = PORT,
    passwd: Path | None = PASSWD,
    acl: Path | None = ACL,
    tls_cert: Path | None = CERT,
    tls_key: Path | None = KEY,
    tls_ca: Path | None = CA,
    log_level: str = opt.LOG_LEVEL,
    log_format: str = opt.LOG_FORMAT,
) -> None:
    """Run the embedded pure-Python MQTT broker (amqtt) for runs without Mosquitto (as `broker start`), or
    manage a broker's logins: add-device, add-server, remove.

    Example: edgegan broker --port 1884
    """
    if context.invoked_subcommand is None:
        serve_embedded_broker(host, port, passwd, acl, tls_cert, tls_key, tls_ca, log_level, log_format)


@broker_app.command("start")
def broker_start(
    config_file: Path | None = opt.CONFIG,
    host: str = HOST,
    port: int = PORT,
    passwd: Path | None = PASSWD,
    acl: Path | None = ACL,
    tls_cert: Path | None = CERT,
    tls_key: Path | None = KEY,
    tls_ca: Path | None = CA,
    log_level: str = opt.LOG_LEVEL,
    log_format: str = opt.LOG_FORMAT,
) -> None:
    """Run the embedded broker: anonymous on loopback, or with --passwd and --acl the same logins and topic
    permissions as Mosquitto with broker/mosquitto.conf.

    Example: edgegan broker start --host 0.0.0.0 --port 8883 --passwd broker/passwd --acl broker/acl.local
    --tls-cert broker/certs/server.crt --tls-key broker/certs/server.key
    """
    serve_embedded_broker(host, port, passwd, acl, tls_cert, tls_key, tls_ca, log_level, log_format)


def serve_embedded_broker(
    host: str, port: int, passwd: Path | None, acl: Path | None, tls_cert: Path | None,
    tls_key: Path | None, tls_ca: Path | None, log_level: str, log_format: str,
) -> None:  # fmt: skip
    import asyncio
    import signal

    from edgegan.runtime.broker import BrokerSecurity, PortInUse, check_security, serve_broker

    setup_logging(log_level, log_format)
    security = BrokerSecurity(
        password_file=passwd, acl_file=acl, tls_cert=tls_cert, tls_key=tls_key, tls_ca=tls_ca
    )
    try:
        check_security(host, security)
    except ValueError as error:
        fail(str(error))

    async def serve() -> None:
        stopped = asyncio.Event()
        for signum in (signal.SIGINT, signal.SIGTERM):
            asyncio.get_running_loop().add_signal_handler(signum, stopped.set)
        await serve_broker(host, port, stopped, security=security)

    try:
        asyncio.run(serve())
    except PortInUse as error:
        fail(str(error), code=1)
    except OSError as error:
        fail(f"cannot listen on {host}:{port}: {error.strerror or error}", code=1)
    except RuntimeError as error:
        fail(str(error), code=1)


def add_identity(
    role: str, name: str, passwd: Path, acl: Path, secrets_dir: Path, server_key: str | None = None
) -> None:
    from edgegan import signing, topics
    from edgegan.runtime import credentials, trust

    try:
        topics.check_name(role, name)
        template = credentials.copy_template_acl(acl)
        servers = credentials.server_identities(acl)
        if role == "device" and name in servers:
            fail(f"{name} is a server identity in {acl}; a device needs a name of its own")
        secret = credentials.new_secret()
        secret_path = secrets_dir / f"{name}.password"
        credentials.write_secret(secret_path, secret)
        replaced = credentials.set_password(passwd, name, secret)
        if role == "server":  # also a login of the servers' listener, where client ids are free
            credentials.set_password(credentials.servers_password_file(passwd), name, secret)
        acl_changed = credentials.add_server(acl, name, role) if role in ("server", "site") else False
        key_path = secrets_dir / f"{name}.server-key"
        if server_key is not None:  # public: no secret, but what the device pins (--server-key)
            key_path.write_text(signing.parse_public_key(server_key).hex() + "\n")
        update_key_path, keys_path = secrets_dir / f"{name}.update-key", secrets_dir / trust.DEVICE_KEYS_FILE
        if role == "device":  # its own key (--update-key); the public half goes to the server's file
            update_key_path.unlink(missing_ok=True)  # again for an existing device: a new key
            update_key = signing.generate_key()
            signing.save_key(update_key, update_key_path)
            keys = trust.DeviceKeys.load(keys_path).keys if keys_path.exists() else {}
            keys[name] = signing.public_bytes(update_key)
            credentials.write_keeping_owner(keys_path, trust.device_keys_text(keys))
    except (ValueError, OSError) as error:
        fail(str(error))
    if template is not None:
        console.print(
            f"copied {template} to {acl}, the ACL these commands edit ({template} stays as shipped); "
            f"the broker reads {acl} as its acl_file (broker/README.md)",
            highlight=False,
        )
    console.print(
        f"{'new password for' if replaced else 'added'} {role} {name!r} in {passwd}"
        + (f"; gave it the {role}'s topics in {acl}" if acl_changed else ""),
        highlight=False,
    )
    console.print(
        f"its password is in {secret_path} (mode 0600): copy it to the {role}, then", highlight=False
    )
    flag = "" if role == "server" else " (its --id defaults to the login)"
    pin = f" --server-key {key_path.name}" if server_key is not None else ""
    if pin:
        console.print(f"the server's public key is in {key_path}: copy it with the password", highlight=False)
    if role == "device":
        console.print(
            f"its update-signing key is in {update_key_path} (mode 0600): copy it too, for --update-key; "
            f"the server checks updates with --device-keys {keys_path}",
            highlight=False,
        )
        pin += f" --update-key {update_key_path.name}"
    if role == "server":
        console.print(f"also in {credentials.servers_password_file(passwd)}: servers connect to the servers' "
                      "listener, mqtts://HOST:8884 (or 1883 on the broker's machine); boards use 8883",
                      highlight=False)  # fmt: skip
    if role == "site":
        console.print(
            f"  in the site broker's copy of broker/site.conf: remote_username {name}, remote_password "
            "<that password>, address <this broker>:8883 (broker/README.md)",
            highlight=False,
        )
    else:
        console.print(f"  edgegan {role} --username {name} --password-file {secret_path.name}{pin} ...{flag}",
                      highlight=False)  # fmt: skip
    console.print(
        "reload the broker so that it reads the change: kill -HUP <mosquitto pid> "
        "(Docker: docker kill --signal=HUP CONTAINER)",
        highlight=False,
    )


SERVER_KEY_TO_PIN = typer.Option(
    None, "--server-key",
    help="The server's public key (64 hex digits, or a file: RUN_DIR/server-signing.key, a PEM or hex "
    "public key), written as NAME.server-key beside the password for the device to pin.",
    show_default=False,
)  # fmt: skip


@broker_app.command("add-device")
def broker_add_device(
    config_file: Path | None = opt.CONFIG,
    name: str = typer.Argument(..., help="The device's name: its MQTT login and its --id."),
    passwd: Path = PASSWD_FILE,
    acl: Path = ACL_FILE,
    secrets_dir: Path = SECRETS_DIR,
    server_key: str | None = SERVER_KEY_TO_PIN,
) -> None:
    """Give a device a login (a new random password; again for an existing device: rotate it). The ACL's
    patterns already let every login publish on its own update and status topics. With --server-key, the
    device's copy of the server's public key too: it then trusts no other (docs/protocol.md, "Threat model").

    Example: edgegan broker add-device pi-0 --server-key runs/server-mnist-s0/server-signing.key
    """
    add_identity("device", name, passwd, acl, secrets_dir, server_key)


@broker_app.command("add-server")
def broker_add_server(
    config_file: Path | None = opt.CONFIG,
    name: str = typer.Argument("server", help="The server's MQTT login."),
    passwd: Path = PASSWD_FILE,
    acl: Path = ACL_FILE,
    secrets_dir: Path = SECRETS_DIR,
) -> None:
    """Give a server (or the live view of `edgegan run`, or an aggregator) a login, and the server's topics
    in the ACL; again for an existing one: rotate its password.

    Example: edgegan broker add-server server
    """
    add_identity("server", name, passwd, acl, secrets_dir)


@broker_app.command("add-site")
def broker_add_site(
    config_file: Path | None = opt.CONFIG,
    name: str = typer.Argument(..., help="The site broker's login on this (the core) broker."),
    passwd: Path = PASSWD_FILE,
    acl: Path = ACL_FILE,
    secrets_dir: Path = SECRETS_DIR,
) -> None:
    """Give a site broker's bridge a login on the core broker, and every device's topics for it in the ACL
    (the site broker checks its own boards' logins): broker/site.conf is the site broker's configuration.
    Again for an existing one: rotate its password.

    Example: edgegan broker add-site site-a
    """
    add_identity("site", name, passwd, acl, secrets_dir)


@broker_app.command("remove")
def broker_remove(
    config_file: Path | None = opt.CONFIG,
    name: str = typer.Argument(..., help="The login to remove."),
    passwd: Path = PASSWD_FILE,
) -> None:
    """Remove a login from the password file (reload the broker afterwards).

    Example: edgegan broker remove pi-0
    """
    from edgegan.runtime import credentials

    try:
        removed = credentials.remove_user(passwd, name)
        credentials.remove_user(credentials.servers_password_file(passwd), name)  # a server's, if any
    except OSError as error:
        fail(f"cannot rewrite {passwd}: {error.strerror}")
    if not removed:
        fail(f"{name} has no login in {passwd}")
    console.print(f"removed {name} from {passwd}; reload the broker (kill -HUP) to apply it", highlight=False)


def certs(
    config_file: Path | None = opt.CONFIG,
    out: Path = typer.Option(Path("broker/certs"), help="Folder for ca.crt, server.crt/.key and clients'."),
    hosts: str = typer.Option(
        "localhost,127.0.0.1,::1",
        help="Comma-separated names and addresses that devices use to reach the broker (the server "
        "certificate is valid for exactly these).",
    ),
    client: list[str] = typer.Option(
        [], "--client", help="Also issue NAME.crt/NAME.key with common name NAME (repeatable)."
    ),
) -> None:
    """Make a development CA, a broker certificate and client certificates, so that TLS works out of the box.
    An existing ca.crt/ca.key in --out is reused. Key files are written with mode 0600.

    Example: edgegan certs --out broker/certs --hosts broker.local,192.168.1.10 --client pi-0
    """
    from edgegan.runtime.certs import make_development_pki

    try:
        issued = make_development_pki(
            out, [host.strip() for host in hosts.split(",") if host.strip()], client
        )
    except (ValueError, OSError) as error:
        fail(str(error))
    for item in issued:
        console.print(f"{item.name}: {item.certificate}  (key {item.key}, mode 0600)", highlight=False)
    console.print(
        "the broker needs ca.crt, server.crt and server.key (broker/mosquitto.conf); clients need ca.crt "
        "(--tls-ca). ca.key signs new certificates: keep it off the broker and the devices.",
        highlight=False,
    )
