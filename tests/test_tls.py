"""https for real: a TLS front (stunnel, as hospitals put nginx or stunnel before Orthanc)
on the session's Orthanc. Debian's Orthanc 1.10.1 and 1.12.7 both crash (civetweb
segfault) on their first TLS handshake with `SslEnabled`, so the front is the way here.

The https wire is pyorthanc's httpx client: it trusts the CA bundle named by
SSL_CERT_FILE; a certificate it does not trust is a setting to fix (exit 2), not a
network hiccup to retry until the deadline.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import run_cli
from test_transfer import series_count, setup_batch

from dicom_transfer import orthanc
from dicom_transfer.errors import OrthancError, Untrusted
from dicom_transfer.orthanc import OrthancRest
from dicom_transfer.stack import HOST, Stack, free_port

pytestmark = pytest.mark.integration


def stunnel() -> str:
    found = shutil.which("stunnel4") or shutil.which("stunnel")
    if found is None:
        pytest.fail("stunnel is not installed: run `bash .ci/setup --tests`")
    return found


def self_signed(workdir: Path) -> tuple[Path, Path]:
    """(certificate, certificate + key) for 127.0.0.1, made with openssl."""
    cert, key = workdir / "cert.pem", workdir / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert,
         "-days", "2", "-subj", f"/CN={HOST}", "-addext", f"subjectAltName=IP:{HOST}"],
        check=True, capture_output=True,
    )  # fmt: skip
    both = workdir / "both.pem"
    both.write_text(cert.read_text() + key.read_text())
    return cert, both


@pytest.fixture
def tls_front(same: Stack, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """https://HOST:PORT in front of the centre Orthanc, and the certificate to trust."""
    cert, both = self_signed(tmp_path)
    port = free_port()
    conf = tmp_path / "stunnel.conf"
    conf.write_text(
        f"foreground = yes\npid =\n[orthanc]\naccept = {HOST}:{port}\n"
        f"connect = {HOST}:{same.centre.spec.http_port}\ncert = {both}\n"
    )
    proc = subprocess.Popen([stunnel(), str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection((HOST, port), timeout=0.5).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"stunnel did not start: {proc.stderr.read() if proc.stderr else ''}") from None
                time.sleep(0.05)
        yield f"https://{HOST}:{port}", cert
    finally:
        proc.terminate()
        proc.wait(10)


def test_https_with_the_ca_trusted(tls_front: tuple[str, Path], same: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    url, cert = tls_front
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    rest = OrthancRest(url, name="local")
    assert isinstance(rest._wire, orthanc._Httpx)
    assert rest.get("/system")["DicomPort"] == same.centre.spec.dicom_port  # the Orthanc behind it
    assert rest.post("/tools/lookup", content="1.2.3.4.5.404") == []
    with pytest.raises(OrthancError) as caught:
        rest.get("/series/0000")
    assert caught.value.status == 404 and not isinstance(caught.value, Untrusted)


def test_an_untrusted_certificate_stops_at_once_with_what_to_set(
    tls_front: tuple[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    url, _ = tls_front
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    rest = OrthancRest(url, name="local", retry_deadline_s=30)
    t0 = time.monotonic()
    with pytest.raises(Untrusted) as caught:
        rest.get("/system")
    assert time.monotonic() - t0 < 5  # not retried for the 30 s deadline
    assert caught.value.exit_code == 2
    assert "SSL_CERT_FILE" in str(caught.value) and url in str(caught.value)


def test_a_batch_over_https(tls_front: tuple[str, Path], same: Stack, tmp_path: Path) -> None:
    """The CLI against https: complete with the CA trusted; exit 2 naming SSL_CERT_FILE without."""
    url, cert = tls_front
    series, batch = setup_batch(same, tmp_path, n=2, per=5, seed=1201)
    cfg = tmp_path / "t.yaml"
    cfg.write_text(
        f"local: {{url: '{url}'}}\nsource: {{modality: PACS}}\ndestination: {{aet: {same.destination_aet}}}\n"
    )
    untrusted = tmp_path / "untrusted.sqlite"
    res = run_cli("--batch", batch, "--config", cfg, "--journal", untrusted, env={"SSL_CERT_FILE": ""})
    assert res.returncode == 2, res.stderr
    assert "TLS certificate not trusted" in res.stderr and "SSL_CERT_FILE" in res.stderr
    assert all(series_count(same.centre, s.series_uid) == 0 for s in series)

    res = run_cli("--batch", batch, "--config", cfg, "--json", env={"SSL_CERT_FILE": str(cert)})
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["complete"] == 2
    assert all(series_count(same.centre, s.series_uid) == 5 for s in series)
