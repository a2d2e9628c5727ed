"""`feddem server`: the run store behind the admin API, over TLS with a bearer token (and, with `--client-ca`, client
certificates signed by that CA).

The TLS files can be those of `feddem certs` (`superlink/server.crt`/`.key`, SANs 127.0.0.1 and localhost plus
every `--san`; clients trust `ca.crt`). The token comes from `--token-file` or FEDDEM_ADMIN_TOKEN, never from the
command line (other users can read a process's arguments).
"""

import logging
import os
import signal
import sys
import threading
from concurrent import futures
from pathlib import Path

import grpc

from feddem.common.errors import FeddemError
from feddem.server.admin.auth import TokenAuth
from feddem.server.admin.client import DEFAULT_ADDRESS, MAX_MESSAGE, TOKEN_ENV, read_file
from feddem.server.admin.service import handlers
from feddem.server.store import Store, default_store_path

log = logging.getLogger("feddem.admin")


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
                 client_ca: Path | None = None, workers: int = 8) -> tuple[grpc.Server, int]:
    """Start serving; returns the server and the bound port (an address ending in :0 picks a free one)."""
    if not token and client_ca is None:
        raise FeddemError(f"refusing to serve without authentication: give --token-file (or set {TOKEN_ENV}), "
                          f"and/or --client-ca")
    credentials = grpc.ssl_server_credentials(
        [(read_file(key, "TLS key"), read_file(cert, "TLS certificate"))],
        root_certificates=read_file(client_ca, "client CA certificate") if client_ca else None,
        require_client_auth=client_ca is not None,
    )
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="feddem-admin"),
        handlers=handlers(store),
        interceptors=[TokenAuth(token)] if token else [],
        options=[("grpc.max_receive_message_length", MAX_MESSAGE), ("grpc.max_send_message_length", MAX_MESSAGE)],
    )
    try:
        port = server.add_secure_port(address, credentials)
    except RuntimeError as exc:
        raise FeddemError(f"cannot listen on {address}: {exc}") from None
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


def run(args) -> None:
    token = read_token(args.token_file)
    store = Store(args.store or default_store_path())
    server, port = start_server(store, args.address, args.cert, args.key, token, args.client_ca)
    host = args.address.rsplit(":", 1)[0]
    auth = " + ".join(filter(None, ["bearer token" if token else "", "client certificate" if args.client_ca else ""]))
    print(f"feddem server: admin API on {host}:{port} (TLS, {auth}); store {store.root}", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    server.stop(grace=5).wait()
    store.close()
    print("feddem server: stopped", file=sys.stderr, flush=True)
