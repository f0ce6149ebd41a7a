"""Keys on a real SoftHSM token: generated there, never extractable, signing for cryptography."""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
import uuid

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding
from pkcs11 import Attribute, ObjectClass

from ca import certs, lint
from ca.errors import CAError, Kind
from ca.hsm import KEY_SPECS, KeySpec, Token, signature_hash
from tests.conftest import ONLINE_PIN, SPARE_PIN, SPARE_TOKEN, SessionPKI

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("spec_name", sorted(KEY_SPECS))
def test_each_issuer_key_type_signs_a_certificate(pki: SessionPKI, spec_name: str) -> None:
    token = Token(pki.module, SPARE_TOKEN, SPARE_PIN)
    label = f"k-{spec_name}-{uuid.uuid4().hex[:8]}"
    key = token.generate_key(label, KeySpec.parse(spec_name))
    subject = certs.parse_name(f"CN=hsm test {spec_name}")
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(certs.new_serial())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(certs.ca_key_usage(), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, signature_hash(key))
    )
    # Verifies with the public key: the HSM produced a valid signature in the X.509 encoding.
    cert.verify_directly_issued_by(cert)
    assert certs.key_type_of(cert.public_key()) == spec_name  # type: ignore[arg-type]
    assert not lint.errors(lint.lint_certificate(cert.public_bytes(serialization.Encoding.DER)))


def test_generated_private_keys_are_sensitive_and_not_extractable(pki: SessionPKI) -> None:
    token = Token(pki.module, SPARE_TOKEN, SPARE_PIN)
    label = f"attr-{uuid.uuid4().hex[:8]}"
    token.generate_key(label, KeySpec.parse("ec-p256"))

    def attributes(session: object) -> tuple[bool, bool]:
        key = session.get_key(object_class=ObjectClass.PRIVATE_KEY, label=label)  # type: ignore[attr-defined]
        return key[Attribute.EXTRACTABLE], key[Attribute.SENSITIVE]

    extractable, sensitive = token.call("read attributes", attributes)
    assert extractable is False
    assert sensitive is True


def test_private_material_cannot_be_exported(pki: SessionPKI) -> None:
    key = pki.online.key("issuing-ec-key")
    with pytest.raises(CAError, match="never leaves the HSM"):
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    with pytest.raises(CAError):
        key.private_numbers()


def test_signature_hashes_match_the_key(pki: SessionPKI) -> None:
    ec_key = pki.online.key("issuing-ec-key")
    signature = ec_key.sign(b"data", ec.ECDSA(hashes.SHA256()))
    ec_key.public_key().verify(signature, b"data", ec.ECDSA(hashes.SHA256()))
    rsa_key = pki.online.key("issuing-rsa-key")
    signature = rsa_key.sign(b"data", padding.PKCS1v15(), hashes.SHA256())
    rsa_key.public_key().verify(signature, b"data", padding.PKCS1v15(), hashes.SHA256())
    with pytest.raises(CAError, match="SHA-256"):
        rsa_key.sign(b"data", padding.PKCS1v15(), hashes.SHA1())  # noqa: S303 - refused on purpose


def test_missing_token_and_key_are_clear_errors(pki: SessionPKI) -> None:
    with pytest.raises(CAError) as exc:
        Token(pki.module, "no-such-token", ONLINE_PIN).key("x")
    assert exc.value.kind is Kind.HSM
    assert "not found" in exc.value.detail
    with pytest.raises(CAError, match="no key labelled 'nope'"):
        pki.online.key("nope")


def test_missing_module_is_a_clear_error() -> None:
    with pytest.raises(CAError, match="does not exist"):
        Token("/nonexistent/libpkcs11.so", "x", "1234").key("x")


def test_duplicate_key_label_is_refused(pki: SessionPKI) -> None:
    with pytest.raises(CAError, match="already exists"):
        pki.online.generate_key("issuing-ec-key", KeySpec.parse("ec-p256"))


def test_unknown_key_type_is_refused() -> None:
    with pytest.raises(CAError, match="unsupported key type"):
        KeySpec.parse("rsa-1024")


# Logs into a token again and again for a while (~100 logins a second, each session held
# 5 ms): SoftHSM rewrites the token's file at each login.
_LOGIN_CHURN = """
import sys, time, pkcs11
module, label, pin, seconds = sys.argv[1:5]
lib = pkcs11.lib(module)
end = time.monotonic() + float(seconds)
while time.monotonic() < end:
    try:
        with lib.get_token(token_label=label).open(user_pin=pin):
            time.sleep(0.005)
    except pkcs11.PKCS11Error:
        pass  # caught mid-rewrite itself; it only has to keep rewriting
"""

# A process starting up, as a gunicorn worker does: find the token and log in, once.
_OPEN_ONCE = """
import sys
from ca.errors import CAError
from ca.hsm import Token
try:
    Token(*sys.argv[1:4]).session()
    print("ok")
except CAError as error:
    print(error.detail)
"""


def test_processes_starting_while_others_log_in_find_the_token(pki: SessionPKI) -> None:
    """SoftHSM rewrites token.object at every login and reads it at C_Initialize, so a process
    starting while others log in can miss the token or fail its login for a moment: with
    this churn, 8 of 80 starts failed before Token._open tried again, 0 of 80 since."""
    env = {**os.environ, "SOFTHSM2_CONF": str(pki.softhsm_conf)}
    args = [pki.module, SPARE_TOKEN, SPARE_PIN]
    churn = [
        subprocess.Popen([sys.executable, "-c", _LOGIN_CHURN, *args, "60"], env=env)
        for _ in range(2)
    ]
    try:
        outcomes: list[str] = []
        for _ in range(8):
            starts = [
                subprocess.Popen(
                    [sys.executable, "-c", _OPEN_ONCE, *args],
                    env=env,
                    stdout=subprocess.PIPE,
                    text=True,
                )
                for _ in range(2)
            ]
            outcomes += [start.communicate(timeout=60)[0].strip() for start in starts]
        assert all(churner.poll() is None for churner in churn), "the churn stopped early"
    finally:
        for churner in churn:
            churner.kill()
            churner.wait()
    assert outcomes == ["ok"] * 16, outcomes
