"""`feddem server`: the run store behind the admin API, over TLS with a bearer token (and, with `--client-ca`, client
certificates signed by that CA).

The TLS files can be those of `feddem certs` (`superlink/server.crt`/`.key`, SANs 127.0.0.1 and localhost plus
every `--san`; clients trust `ca.crt`); a key that is not the certificate's is refused before anything starts, and
a certificate that has expired or expires within 30 days is warned about. The token comes from `--token-file` or
FEDDEM_ADMIN_TOKEN, never from the command line (other users can read a process's arguments).

Bounds: an address in use is refused (no SO_REUSEPORT: two servers never split the clients between two stores);
`workers` threads serve at most `2 * workers` calls at once (more are RESOURCE_EXHAUSTED), each call within the
idle and call limits of `server.admin.limits`; messages up to 16 MiB; idle connections are closed, dead ones found
by keepalive pings. Server-side data (evaluation, pool ranking) is read only from the `--data-root` folders.
"""

import datetime
import logging
import os
import signal
import socket
import sys
import threading
from concurrent import futures
from pathlib import Path

import grpc

from feddem.common.errors import FeddemError
from feddem.server.admin.auth import TokenAuth
from feddem.server.admin.client import DEFAULT_ADDRESS, MAX_MESSAGE, TOKEN_ENV, read_file
from feddem.server.admin.limits import Limits
from feddem.server.admin.service import handlers
from feddem.server.store import Store, default_store_path

log = logging.getLogger("feddem.admin")
EXPIRY_WARNING = datetime.timedelta(days=30)
WORKERS = 16


def server_options() -> list[tuple[str, int]]:
    return [
        ("grpc.so_reuseport", 0),  # a second server on a port in use fails instead of sharing it
        ("grpc.max_receive_message_length", MAX_MESSAGE),
        ("grpc.max_send_message_length", MAX_MESSAGE),
        ("grpc.max_concurrent_streams", 16),  # calls at once on one connection
        ("grpc.max_connection_idle_ms", 15 * 60 * 1000),  # close connections idle this long
        ("grpc.keepalive_time_ms", 60 * 1000),  # ping clients to find dead connections
        ("grpc.keepalive_timeout_ms", 20 * 1000),
        ("grpc.server_handshake_timeout_ms", 20 * 1000),  # a TLS handshake that stalls
        ("grpc.max_metadata_size", 16 * 1024),
    ]


def check_tls(cert: Path, key: Path) -> list[str]:
    """Refuse a key that is not the certificate's (FeddemError naming both files); return warnings about the
    certificate's validity (expired, or expiring within 30 days)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        certificate = x509.load_pem_x509_certificate(read_file(cert, "TLS certificate"))
    except ValueError as exc:
        raise FeddemError(f"--cert '{cert}' is not a PEM certificate: {exc}") from None
    try:
        private = serialization.load_pem_private_key(read_file(key, "TLS key"), password=None)
    except (ValueError, TypeError) as exc:
        raise FeddemError(f"--key '{key}' is not an unencrypted PEM private key: {exc}") from None
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if private.public_key().public_bytes(*spki) != certificate.public_key().public_bytes(*spki):
        raise FeddemError(f"the TLS key '{key}' does not match the certificate '{cert}' (their public keys differ): "
                          f"give the key the certificate was issued for")
    now = datetime.datetime.now(datetime.timezone.utc)
    ends = certificate.not_valid_after_utc
    if ends <= now:
        return [f"the TLS certificate '{cert}' expired on {ends:%Y-%m-%d %H:%M} UTC: clients will refuse it; "
                f"renew it (`feddem certs`)"]
    if ends - now <= EXPIRY_WARNING:
        return [f"the TLS certificate '{cert}' expires on {ends:%Y-%m-%d %H:%M} UTC (in {(ends - now).days} days): "
                f"renew it (`feddem certs`)"]
    return []


def check_address(address: str) -> None:
    """Refuse an address whose port another process holds (a clear error before gRPC's 'Failed to bind')."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise FeddemError(f"--address '{address}' is not HOST:PORT")
    if int(port) == 0:
        return
    host = host.strip("[]") or "0.0.0.0"
    try:
        infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise FeddemError(f"--address '{address}': cannot resolve '{host}' ({exc.strerror})") from None
    family, kind, proto, _, where = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(where)
        except OSError as exc:
            if exc.errno == 98:  # EADDRINUSE
                raise FeddemError(f"cannot listen on {address}: the port is in use (another feddem server, or "
                                  f"another program): stop it or choose another --address") from None
            raise FeddemError(f"cannot listen on {address}: {exc.strerror}") from None


def check_data_roots(roots: list[Path] | None) -> tuple[Path, ...]:
    resolved = []
    for root in roots or []:
        path = Path(root).expanduser().resolve()
        if not path.is_dir():
            raise FeddemError(f"--data-root '{root}' is not a folder")
        resolved.append(path)
    return tuple(resolved)


def read_token(token_file: Path | None) -> str:
    if token_file:
        token = read_file(token_file, "token file").decode().strip()
    else:
        token = os.environ.get(TOKEN_ENV, "").strip()
    if token and len(token) < 16:
        raise FeddemError("the admin token is shorter than 16 characters: use a random one, e.g. "
                          "`python -c 'import secrets; print(secrets.token_hex(32))'`")
    return token


def start_server(store: Store, address: str, cert: Path, key: Path, token: str,
                 client_ca: Path | None = None, workers: int = WORKERS, data_roots: tuple[Path, ...] = (),
                 limits: Limits = Limits()) -> tuple[grpc.Server, int]:
    """Start serving; returns the server and the bound port (an address ending in :0 picks a free one)."""
    if not token and client_ca is None:
        raise FeddemError(f"refusing to serve without authentication: give --token-file (or set {TOKEN_ENV}), "
                          f"and/or --client-ca")
    check_tls(cert, key)
    check_address(address)
    credentials = grpc.ssl_server_credentials(
        [(read_file(key, "TLS key"), read_file(cert, "TLS certificate"))],
        root_certificates=read_file(client_ca, "client CA certificate") if client_ca else None,
        require_client_auth=client_ca is not None,
    )
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="feddem-admin"),
        handlers=handlers(store, data_roots, limits),
        interceptors=[TokenAuth(token)] if token else [],
        options=server_options(),
        maximum_concurrent_rpcs=2 * workers,
    )
    try:
        port = server.add_secure_port(address, credentials)
    except RuntimeError as exc:
        raise FeddemError(f"cannot listen on {address} (in use, or not an address of this machine): {exc}") from None
    if port == 0:
        raise FeddemError(f"cannot listen on {address} (in use, or not an address of this machine)")
    server.start()
    return server, port


def add_parser(sub) -> None:
    """Register `feddem server` on the CLI's subparsers."""
    p = sub.add_parser(
        "server",
        help="serve the run store and the admin API (gRPC over TLS, bearer token)",
        description="Serve the feddem run store over the admin API (feddem.admin.v1: AdminService for "
        "`feddem-admin`, RecorderService for ServerApps that record their runs). TLS always; every call needs the "
        "bearer token (and, with --client-ca, a client certificate signed by that CA). A run left `running` by a "
        "server that stopped is marked failed (interrupted) when the store opens again.",
    )
    p.add_argument("--store", type=Path, default=None, metavar="DIR",
                   help="store folder (SQLite store.db + artefacts/; default: $FEDDEM_HOME/store)")
    p.add_argument("--address", default=DEFAULT_ADDRESS, metavar="HOST:PORT",
                   help=f"where to listen (default: {DEFAULT_ADDRESS}; port 0 picks a free one)")
    p.add_argument("--cert", type=Path, required=True, metavar="FILE",
                   help="TLS certificate (PEM), e.g. from `feddem certs` (superlink/server.crt)")
    p.add_argument("--key", type=Path, required=True, metavar="FILE", help="its private key (PEM)")
    p.add_argument("--token-file", type=Path, default=None, metavar="FILE",
                   help=f"file holding the bearer token clients must send (default: ${TOKEN_ENV})")
    p.add_argument("--client-ca", type=Path, default=None, metavar="FILE",
                   help="also require a client certificate signed by this CA (PEM)")
    p.add_argument("--data-root", type=Path, action="append", default=None, metavar="DIR",
                   help="a folder whose data `feddem-admin evaluate` and `pool rank` may name (repeatable; default: "
                   "none, so only `synthetic` data)")
    p.add_argument("--idle-timeout", type=float, default=Limits.idle, metavar="SECONDS",
                   help=f"end a call whose client sends or takes nothing for this long (default: {Limits.idle:g})")
    p.add_argument("--call-timeout", type=float, default=Limits.call, metavar="SECONDS",
                   help=f"end any call that lasts longer (default: {Limits.call:g})")


def run(args) -> None:
    token = read_token(args.token_file)
    if not (args.idle_timeout > 0 and args.call_timeout > 0):
        raise FeddemError("--idle-timeout and --call-timeout must be positive")
    roots = check_data_roots(args.data_root)
    if not token and args.client_ca is None:  # (start_server says so too) before the store is opened
        raise FeddemError(f"refusing to serve without authentication: give --token-file (or set {TOKEN_ENV}), "
                          f"and/or --client-ca")
    for warning in check_tls(args.cert, args.key):
        print(f"feddem server: warning: {warning}", file=sys.stderr, flush=True)
    check_address(args.address)
    store = Store(args.store or default_store_path())
    server, port = start_server(store, args.address, args.cert, args.key, token, args.client_ca,
                                data_roots=roots, limits=Limits(args.idle_timeout, args.call_timeout))
    host = args.address.rsplit(":", 1)[0]
    auth = " + ".join(filter(None, ["bearer token" if token else "", "client certificate" if args.client_ca else ""]))
    data = ", ".join(map(str, roots)) or "none (synthetic only)"
    print(f"feddem server: admin API on {host}:{port} (TLS, {auth}); store {store.root}; data roots {data}",
          flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    server.stop(grace=5).wait()
    store.close()
    print("feddem server: stopped", file=sys.stderr, flush=True)
