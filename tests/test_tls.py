"""``serve`` over HTTPS with a self-signed certificate (loopback only), the client's ``--ca-bundle``, and
the first mistakes that need a running server: ``--k`` over its ``k_max``, an output directory of
another cache."""

from __future__ import annotations

import datetime
import ipaddress
import ssl

import httpx
import pyarrow.parquet as pq
import pytest

from tests.conftest import SAMPLE, Server, read_lines, teacher_farm
from tests.helpers import one_line_error

pytestmark = pytest.mark.engine


def self_signed(directory):
    """A certificate for 127.0.0.1 that is its own CA, and its key, as PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "teacher-farm test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


@pytest.fixture(scope="module")
def tls_server(tiny_model, tmp_path_factory):
    """A server without an API key on loopback, over HTTPS."""
    directory = tmp_path_factory.mktemp("tls")
    cert, key = self_signed(directory)
    srv = Server(tiny_model, directory / "server.log", "--ssl-certfile", str(cert), "--ssl-keyfile", str(key))
    srv.url = srv.url.replace("http://", "https://")
    srv.cert = cert
    srv.start()
    context = ssl.create_default_context(cafile=str(cert))

    def healthy_over_tls() -> bool:
        try:
            return httpx.get(srv.url + "/health", verify=context, timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    try:
        srv.wait_ready(ready=healthy_over_tls)
        yield srv
    finally:
        srv.stop()


@pytest.fixture()
def corpus(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(read_lines(SAMPLE, 3)) + "\n", encoding="utf-8")
    return path


def cache(srv, corpus, out, *extra):
    return teacher_farm(
        "cache",
        "--server",
        srv.url,
        "--input",
        str(corpus),
        "--out",
        str(out),
        "--k",
        "4",
        "--max-length",
        "512",
        *extra,
    )


def test_cache_over_https_with_the_servers_ca(tls_server, corpus, tmp_path):
    proc = cache(tls_server, corpus, tmp_path / "o", "--ca-bundle", str(tls_server.cert))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert pq.read_table(sorted((tmp_path / "o").glob("part-*.parquet"))).num_rows == 3


def test_an_untrusted_certificate_is_one_line_that_names_the_fix(tls_server, corpus, tmp_path):
    line = one_line_error(cache(tls_server, corpus, tmp_path / "o", "--retry-for", "5"))
    assert tls_server.url in line and "--ca-bundle" in line


def test_serve_on_loopback_without_a_key_does_not_warn(tls_server):
    assert "anyone on the network" not in tls_server.tail(1 << 20)


def test_k_over_the_servers_k_max(tls_server, corpus, tmp_path):
    line = one_line_error(
        cache(tls_server, corpus, tmp_path / "o", "--ca-bundle", str(tls_server.cert), "--k", "257")
    )
    assert "k_max=256" in line and "--k-max 257" in line


def test_an_output_directory_of_another_cache(tls_server, corpus, tmp_path):
    out = tmp_path / "o"
    assert cache(tls_server, corpus, out, "--ca-bundle", str(tls_server.cert)).returncode == 0
    line = one_line_error(cache(tls_server, corpus, out, "--ca-bundle", str(tls_server.cert), "--k", "5"))
    assert "belongs to another cache" in line and "k: 4 there, 5 now" in line and "new --out" in line
