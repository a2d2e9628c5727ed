"""The client side of the admin API: a TLS channel that sends `authorization: Bearer <token>` with every call, and
messages as plain dicts (for `--json` and tables)."""

from pathlib import Path

import grpc

from feddem.common.errors import FeddemError

ADDRESS_ENV, TOKEN_ENV, CA_ENV = "FEDDEM_ADMIN_SERVER", "FEDDEM_ADMIN_TOKEN", "FEDDEM_ADMIN_CA"
CERT_ENV, KEY_ENV = "FEDDEM_ADMIN_CERT", "FEDDEM_ADMIN_KEY"  # a client certificate, for servers that ask for one
DEFAULT_ADDRESS = "127.0.0.1:9095"
MAX_MESSAGE = 16 << 20  # bytes; artefacts travel in 1 MiB chunks, reports are far smaller


def read_file(path: str | Path, what: str) -> bytes:
    try:
        return Path(path).expanduser().read_bytes()
    except OSError as exc:
        raise FeddemError(f"cannot read the {what} '{path}': {exc.strerror}") from None


def open_channel(address: str, token: str, ca: str | Path | None, cert: str | Path | None = None,
                 key: str | Path | None = None) -> grpc.Channel:
    """A TLS channel to a feddem server. `ca`: the CA certificate that signed the server's (None: the system's
    roots). The token goes with every call as a bearer token (gRPC sends call credentials only over TLS);
    `cert`/`key`: a client certificate and its key, for a server started with --client-ca."""
    if not address:
        raise FeddemError(f"no server address: give --server HOST:PORT or set {ADDRESS_ENV}")
    if bool(cert) != bool(key):
        raise FeddemError("a client certificate needs both --cert and --key")
    credentials = grpc.ssl_channel_credentials(
        root_certificates=read_file(ca, "CA certificate") if ca else None,
        private_key=read_file(key, "client key") if key else None,
        certificate_chain=read_file(cert, "client certificate") if cert else None,
    )
    if token:
        credentials = grpc.composite_channel_credentials(credentials, grpc.access_token_call_credentials(token))
    options = [("grpc.max_receive_message_length", MAX_MESSAGE), ("grpc.max_send_message_length", MAX_MESSAGE)]
    return grpc.secure_channel(address, credentials, options=options)


def to_dict(message) -> dict:
    """A message as a dict with every field (defaults included), int64 as int (unlike protobuf's JSON mapping)."""
    out = {}
    for field in message.DESCRIPTOR.fields:
        value = getattr(message, field.name)
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            value_field = field.message_type.fields_by_name["value"]
            out[field.name] = {k: (to_dict(v) if value_field.message_type else v) for k, v in value.items()}
        elif field.message_type is not None:
            out[field.name] = [to_dict(v) for v in value] if field.is_repeated else to_dict(value)
        else:
            out[field.name] = list(value) if field.is_repeated else value
    return out
