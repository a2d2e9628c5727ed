"""`feddem certs`: what it writes verifies as a chain, carries the asked-for SANs, is in the formats Flower reads,
keeps private keys at 0600, and is never overwritten without --force."""

import ipaddress
import stat
import subprocess
import sys

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_private_key, load_ssh_private_key, load_ssh_public_key
from flwr.supercore.primitives.asymmetric import uses_nist_ec_curve

from feddem.common.errors import FeddemError
from feddem.server.certs import CertPaths, generate, site_names


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_chain_sans_and_modes(tmp_path):
    result = generate(tmp_path / "certs", ["hospital-a", "hospital-b"], ["superlink", "10.0.0.7"])
    p = result.paths
    ca = x509.load_pem_x509_certificate(p.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(p.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)  # raises when the CA did not sign it
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"localhost", "superlink"}
    assert set(san.get_values_for_type(x509.IPAddress)) == {ipaddress.ip_address("127.0.0.1"),
                                                             ipaddress.ip_address("10.0.0.7")}
    # the server key belongs to the server certificate
    server_key = load_pem_private_key(p.server_key.read_bytes(), None)
    assert server_key.public_key().public_numbers() == server.public_key().public_numbers()

    for site in ("hospital-a", "hospital-b"):
        private = load_ssh_private_key(p.site_key(site).read_bytes(), None)  # what flower-supernode does
        public = load_ssh_public_key(p.site_pub(site).read_bytes())  # what `flwr supernode register` does
        assert isinstance(private, ec.EllipticCurvePrivateKey) and uses_nist_ec_curve(public)
        assert private.public_key().public_numbers() == public.public_numbers()
        assert _mode(p.site_key(site)) == 0o600 and _mode(p.site_pub(site)) == 0o644
    assert _mode(p.ca_key) == 0o600 and _mode(p.server_key) == 0o600
    assert p.site_pub("hospital-a").read_bytes() != p.site_pub("hospital-b").read_bytes()


def test_refuses_to_overwrite_unless_forced(tmp_path):
    out = tmp_path / "certs"
    first = generate(out, ["a"])
    before = {path: path.read_bytes() for path in first.written}
    with pytest.raises(FeddemError, match=r"refusing to overwrite .*ca\.key.*sites/a/node\.key.*--force"):
        generate(out, ["a"])
    assert {path: path.read_bytes() for path in first.written} == before  # untouched

    paths = CertPaths(out)
    paths.site_key("a").chmod(0o644)  # a loosened key must come back 0600
    generate(out, ["a"], force=True)
    assert paths.site_key("a").read_bytes() != before[paths.site_key("a")]
    assert _mode(paths.site_key("a")) == 0o600


def test_site_names_and_bad_input(tmp_path):
    assert site_names("3") == ["site-0", "site-1", "site-2"]
    assert site_names("a, b,c") == ["a", "b", "c"]
    for bad in ("0", "a,a", "../x", ","):
        with pytest.raises(FeddemError):
            site_names(bad)
    with pytest.raises(FeddemError, match="neither an IP address nor a DNS name"):
        generate(tmp_path / "c", ["a"], ["bad name!"])
    assert not (tmp_path / "c").exists()  # nothing written on bad input
    for days in (0, 10**9):
        with pytest.raises(FeddemError, match=f"--days must be between 1 and 36500 \\(100 years\\), got {days}"):
            generate(tmp_path / "c", ["a"], days=days)
    assert not (tmp_path / "c").exists()


def test_cli(tmp_path):
    out = tmp_path / "certs"
    args = [sys.executable, "-m", "feddem.server.cli", "certs", "--out", str(out), "--sites", "2", "--san", "superlink"]
    first = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    assert (out / "sites" / "site-1" / "node.pub").is_file() and "superlink" in first.stdout
    assert sorted(p.name for p in (out / "sites").iterdir()) == ["site-0", "site-1"]  # as feddem simulate names them
    again = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "refusing to overwrite" in again.stderr and "Traceback" not in again.stderr
