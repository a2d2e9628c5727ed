"""`feddem certs`: the key material of a deployment, generated with `cryptography`.

One call writes, under an output folder (default `deploy/certs`, where `deploy/compose.yaml` and the manifests in
`deploy/k8s/` mount them from):

    ca.crt, ca.key                  a CA (ECDSA P-384) that signs the SuperLink's certificate; every site and every
                                    `flwr` user gets `ca.crt` (`--root-certificates`, `root-certificates`)
    superlink/server.crt, .key      the SuperLink's TLS certificate, signed by the CA, with SANs `127.0.0.1`,
                                    `localhost` and every `--san` (the names that sites and the CLI dial)
    sites/<site>/node.key, .pub     one ECDSA P-384 key pair per site for SuperNode authentication, in the OpenSSH
                                    format Flower reads (`flower-supernode --auth-supernode-private-key node.key`,
                                    `flwr supernode register node.pub`)

Private keys are written with mode 0600 (created so, never widened). Nothing is overwritten unless `force` is set:
without it, any existing file among those to be written is an error that names the files.
"""

import datetime
import ipaddress
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from feddem.common.errors import FeddemError

DEFAULT_SANS = ("127.0.0.1", "localhost")
DEFAULT_OUT = Path("deploy") / "certs"
SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
MAX_DAYS = 36500  # validity limit: beyond it a date overflows (and no deployment needs more)
CURVE = ec.SECP384R1  # a NIST curve: Flower accepts only those for SuperNode keys


@dataclass(frozen=True)
class CertPaths:
    """Where each piece lives under the output folder (the layout deploy/ mounts)."""

    root: Path

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.root / "ca.key"

    @property
    def server_cert(self) -> Path:
        return self.root / "superlink" / "server.crt"

    @property
    def server_key(self) -> Path:
        return self.root / "superlink" / "server.key"

    def site_key(self, site: str) -> Path:
        return self.root / "sites" / site / "node.key"

    def site_pub(self, site: str) -> Path:
        return self.root / "sites" / site / "node.pub"


@dataclass
class CertsResult:
    paths: CertPaths
    sites: list[str]
    sans: list[str]
    written: list[Path] = field(default_factory=list)


def site_names(spec: str) -> list[str]:
    """`--sites`: a count N (sites `site-0` .. `site-(N-1)`, the names `feddem simulate` gives its sites) or a
    comma-separated list of names."""
    spec = spec.strip()
    if spec.isdigit():
        count = int(spec)
        if count < 1:
            raise FeddemError("--sites: give at least one site")
        return [f"site-{i}" for i in range(count)]
    names = [n.strip() for n in spec.split(",") if n.strip()]
    bad = [n for n in names if not SITE_NAME.match(n)]
    if not names or bad:
        raise FeddemError(f"--sites '{spec}': give a number or comma-separated names of letters, digits, '.', '_', "
                          f"'-' (bad: {', '.join(bad) or '(none given)'})")
    if len(set(names)) != len(names):
        raise FeddemError(f"--sites '{spec}' names a site twice")
    return names


def _san_entry(value: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(value))
    except ValueError:
        pass
    if not re.match(r"^(\*\.)?[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?$", value):
        raise FeddemError(f"--san '{value}' is neither an IP address nor a DNS name")
    return x509.DNSName(value)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "feddem"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def make_ca(days: int) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(CURVE())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("feddem deployment CA"))
        .issuer_name(_name("feddem deployment CA"))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    return key, cert


def make_server_cert(ca_key, ca_cert: x509.Certificate, sans: list[str], days: int):
    """The SuperLink's TLS certificate: server auth, the given SANs, the first one as common name."""
    key = ec.generate_private_key(CURVE())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(sans[0]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([_san_entry(s) for s in sans]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    return key, cert


def make_site_key() -> tuple[bytes, bytes]:
    """One site's SuperNode key pair as (OpenSSH private key, OpenSSH public key line)."""
    key = ec.generate_private_key(CURVE())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return private, public + b"\n"


def _write(path: Path, data: bytes, private: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():  # only reached with force: replace the file, so a private key never keeps wider modes
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chmod(path, 0o600 if private else 0o644)  # umask may have narrowed the public ones


def generate(out: Path, sites: list[str], extra_sans: list[str] = (), days: int = 365,
             force: bool = False) -> CertsResult:
    """Write the CA, the SuperLink certificate and one key pair per site under `out` (see the module docstring)."""
    if not 1 <= days <= MAX_DAYS:
        raise FeddemError(f"--days must be between 1 and {MAX_DAYS} (100 years), got {days}")
    paths = CertPaths(Path(out).expanduser())
    sans = list(dict.fromkeys([*DEFAULT_SANS, *extra_sans]))
    for san in sans:  # check them all before writing anything
        _san_entry(san)
    targets = [paths.ca_cert, paths.ca_key, paths.server_cert, paths.server_key]
    targets += [p for s in sites for p in (paths.site_key(s), paths.site_pub(s))]
    existing = [p for p in targets if p.exists()]
    if existing and not force:
        raise FeddemError(f"refusing to overwrite existing key material in {paths.root}: "
                          f"{', '.join(str(p.relative_to(paths.root)) for p in existing)} (use --force to replace)")

    ca_key, ca_cert = make_ca(days)
    server_key, server_cert = make_server_cert(ca_key, ca_cert, sans, days)
    pem = serialization.Encoding.PEM
    files = [(paths.ca_cert, ca_cert.public_bytes(pem), False), (paths.ca_key, _pem_key(ca_key), True),
             (paths.server_cert, server_cert.public_bytes(pem), False),
             (paths.server_key, _pem_key(server_key), True)]
    for site in sites:
        private, public = make_site_key()
        files += [(paths.site_key(site), private, True), (paths.site_pub(site), public, False)]
    for path, data, private in files:
        _write(path, data, private)
    return CertsResult(paths, sites, sans, [p for p, _, _ in files])


def add_parser(sub) -> None:
    """Register `feddem certs` on the CLI's subparsers."""
    p = sub.add_parser(
        "certs",
        help="generate a deployment's CA, SuperLink TLS certificate and per-site SuperNode keys",
        description="Generate, for a multi-site deployment: a CA (ca.crt, ca.key), the SuperLink's TLS certificate "
        "signed by it (superlink/server.crt, server.key; SANs 127.0.0.1, localhost and every --san), and one ECDSA "
        "P-384 key pair per site for SuperNode authentication (sites/<site>/node.key, node.pub; OpenSSH format). "
        "Private keys get mode 0600. Existing files are never overwritten unless --force.",
    )
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, metavar="DIR",
                   help=f"output folder (default: {DEFAULT_OUT}, where deploy/ mounts it from)")
    p.add_argument("--sites", default="3", metavar="N|a,b,c",
                   help="number of sites (named site-0..site-(N-1), as in feddem simulate) or their names "
                   "(default: 3)")
    p.add_argument("--san", action="append", default=[], metavar="NAME_OR_IP",
                   help="extra subject alternative name of the SuperLink certificate: the host name or address "
                   "that sites dial, e.g. --san superlink --san link.example.org (repeatable)")
    p.add_argument("--days", type=int, default=365, help="validity of the certificates in days (default: 365)")
    p.add_argument("--force", action="store_true", help="replace existing certificates and keys")


def run(args) -> None:
    result = generate(args.out, site_names(args.sites), args.san, args.days, args.force)
    p = result.paths
    print(f"CA:        {p.ca_cert} (key {p.ca_key}: keep it offline)")
    print(f"SuperLink: {p.server_cert}, {p.server_key} (SANs: {', '.join(result.sans)})")
    for site in result.sites:
        print(f"site {site}: {p.site_key(site)} (to the site only), {p.site_pub(site)} (register with "
              f"`flwr supernode register {p.site_pub(site)} <connection>`)")
