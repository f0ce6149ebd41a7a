"""Alternate certificate chains (RFC 8555 §7.4.2): one per cross-certificate of the issuer.

Chain 0 is the leaf and its issuer's own chain; when a second root has cross-signed the
issuer, chain n is the leaf and the n-th cross-certificate, and every response links
(rel="alternate") to all the other chains. The rig is test_acme_protocol's, its fixtures
imported by name so pytest finds them here; SQLite only.
"""

from __future__ import annotations

import datetime
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from werkzeug.test import TestResponse

from ca import ceremony, certs
from ca.clock import Clock, FakeClock
from ca.hsm import KeySpec
from ca.storage import Storage
from tests.conftest import BASE_URL, ONLINE_PIN, SessionPKI
from tests.integration.acme_harness import ChallTestSrv
from tests.integration.test_acme_protocol import (
    ChallengeResponder,
    Server,
    assert_problem,
    dns,
    issue,
    responder,
    running_server,
    server,
    sqlite_only,
)
from tests.integration.test_acme_protocol_more import links

# The rig's fixtures, imported so that pytest finds them in this module too.
__all__ = ["dns", "responder", "server"]

pytestmark = [pytest.mark.integration, sqlite_only]


@pytest.fixture(scope="module")
def second_root(pki: SessionPKI) -> ceremony.RootKey:
    """A second root (a root rotation's new one), its key beside the first on the root token."""
    return ceremony.create_root(
        pki.root_token,
        key_label="alternates-root-2-key",
        spec=KeySpec.parse("ec-p384"),
        subject=certs.parse_name("CN=certwright test root 2,O=certwright tests"),
        validity=datetime.timedelta(days=3650),
        path_length=1,
    )


def cross_sign_issuing_ec(
    server: Server, root: ceremony.RootKey, *, clock: Clock | None = None, days: int = 365
) -> x509.Certificate:
    ceremony.register_root(server.storage, "root-2", root.certificate, "tests")
    return ceremony.cross_sign(
        server.storage,
        root,
        issuer_id="issuing-ec",
        validity=datetime.timedelta(days=days),
        public_base_url=BASE_URL,
        actor="tests",
        clock=clock,
    )


def alternates(response: TestResponse) -> set[str]:
    return {url for url, rel in links(response) if rel == "alternate"}


def test_without_cross_certificates_there_is_no_alternate(server: Server) -> None:
    client = server.account()
    issued = issue(server, client, ["plain.alternates.test"])
    download = client.get(issued.order["certificate"])
    assert download.status_code == 200
    assert alternates(download) == set()
    assert len(x509.load_pem_x509_certificates(download.get_data())) == 2
    assert_problem(client.get(f"{issued.order['certificate']}/1"), "malformed", 404)


def test_a_cross_certificate_is_an_alternate_chain_to_the_second_root(
    server: Server, pki: SessionPKI, second_root: ceremony.RootKey, tmp_path: Path
) -> None:
    client = server.account()
    issued = issue(server, client, ["cross.alternates.test"])
    url = issued.order["certificate"]
    assert alternates(client.get(url)) == set()  # read (and cached) before the ceremony

    cross = cross_sign_issuing_ec(server, second_root)
    own = x509.load_pem_x509_certificates(issued.pem.encode())[1]
    assert cross.subject == own.subject
    assert cross.public_key() == own.public_key()
    assert cross.extensions.get_extension_for_class(
        x509.SubjectKeyIdentifier
    ) == own.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)

    # The ceremony ran after this server read the chain; the download sees it all the same.
    default = client.get(url)
    assert default.status_code == 200
    assert alternates(default) == {f"{url}/1"}
    assert default.get_data() == client.get(f"{url}/0").get_data()
    chain0 = x509.load_pem_x509_certificates(default.get_data())
    assert chain0[1] == own

    alternate = client.get(f"{url}/1")
    assert alternate.status_code == 200, alternate.get_data(as_text=True)
    assert alternate.mimetype == "application/pem-certificate-chain"
    assert alternates(alternate) == {url}
    chain1 = x509.load_pem_x509_certificates(alternate.get_data())
    assert chain1 == [issued.leaf, cross]
    assert_problem(client.get(f"{url}/2"), "malformed", 404)

    root2 = tmp_path / "root2.pem"
    root2.write_bytes(second_root.certificate.public_bytes(serialization.Encoding.PEM))
    leaf = tmp_path / "leaf.pem"
    leaf.write_bytes(issued.leaf.public_bytes(serialization.Encoding.PEM))
    untrusted = tmp_path / "cross.pem"
    untrusted.write_bytes(cross.public_bytes(serialization.Encoding.PEM))
    for anchor, via in ((root2, untrusted), (pki.root_pem, None)):
        chain_file = via
        if chain_file is None:
            chain_file = tmp_path / "own.pem"
            chain_file.write_bytes(own.public_bytes(serialization.Encoding.PEM))
        verify = subprocess.run(
            ["openssl", "verify", "-CAfile", str(anchor), "-untrusted", str(chain_file), str(leaf)],
            capture_output=True,
            text=True,
            check=False,
        )
        assert verify.returncode == 0, verify.stdout + verify.stderr


def test_an_expired_cross_certificate_is_no_longer_offered(
    storage: Storage,
    pki: SessionPKI,
    second_root: ceremony.RootKey,
    tmp_path: Path,
    dns: ChallTestSrv,
    responder: ChallengeResponder,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CERTWRIGHT_HSM_PIN", ONLINE_PIN)
    clock = FakeClock(datetime.datetime.now(datetime.UTC).replace(microsecond=0))
    with running_server(storage, tmp_path, dns, responder, clock=clock) as srv:
        client = srv.account()
        issued = issue(srv, client, ["expired.alternates.test"])
        cross_sign_issuing_ec(srv, second_root, clock=clock, days=30)
        url = issued.order["certificate"]
        assert alternates(client.get(url)) == {f"{url}/1"}
        clock.advance(datetime.timedelta(days=31))
        assert alternates(client.get(url)) == set()
        assert_problem(client.get(f"{url}/1"), "malformed", 404)
