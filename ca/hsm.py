"""Keys behind PKCS#11: the one key interface every signature of the CA goes through.

Private keys are generated on the token, marked sensitive and non-extractable, and never leave
it. `HsmEcPrivateKey` and `HsmRsaPrivateKey` implement cryptography's private-key interfaces by
forwarding `sign()` to the token, so `CertificateBuilder.sign`, `CertificateRevocationListBuilder
.sign` and `OCSPResponseBuilder.sign` use them as they would a software key.

Facts that shape this module (DESIGN.md §2, §6):
- SoftHSM 2.6 offers `CKM_ECDSA` (we hash first and convert raw r||s to DER), not
  `CKM_ECDSA_SHA256`; for RSA it offers `CKM_SHA256_RSA_PKCS` and friends.
- Two threads signing on separate sessions of one SoftHSM token segfaulted. So: one session
  per process, opened lazily (after any fork), and a lock around every call into it.
- A token created after the library was initialised is not visible to that process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import threading
import time
from typing import Any, NoReturn

import pkcs11
import pkcs11.exceptions as p11err
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
from pkcs11.util.ec import encode_ec_public_key, encode_named_curve_parameters

from ca.errors import CAError, Kind


@dataclasses.dataclass(frozen=True)
class KeySpec:
    """A key type the CA may hold: `ec-p256`, `ec-p384`, `rsa-2048`, `rsa-3072`, `rsa-4096`."""

    name: str
    algorithm: str  # "ec" | "rsa"
    bits: int
    curve_name: str | None = None  # the PKCS#11 / SEC 2 name, for EC keys

    @staticmethod
    def parse(name: str) -> KeySpec:
        try:
            return KEY_SPECS[name.lower()]
        except KeyError:
            raise CAError(
                Kind.BAD_REQUEST,
                f"unsupported key type {name!r}; choose one of {', '.join(KEY_SPECS)}",
            ) from None


KEY_SPECS: dict[str, KeySpec] = {
    "ec-p256": KeySpec("ec-p256", "ec", 256, "secp256r1"),
    "ec-p384": KeySpec("ec-p384", "ec", 384, "secp384r1"),
    "rsa-2048": KeySpec("rsa-2048", "rsa", 2048),
    "rsa-3072": KeySpec("rsa-3072", "rsa", 3072),
    "rsa-4096": KeySpec("rsa-4096", "rsa", 4096),
}

_RSA_MECHANISMS = {
    "sha256": Mechanism.SHA256_RSA_PKCS,
    "sha384": Mechanism.SHA384_RSA_PKCS,
    "sha512": Mechanism.SHA512_RSA_PKCS,
}

_libraries: dict[str, Any] = {}
_libraries_lock = threading.Lock()
# Bumped by each re-initialisation of a module: sessions opened before it are gone.
_generations: dict[str, int] = {}
# Modules a login failed on: initialised anew before the next login (see `_reinitialize`).
_stale: set[str] = set()
# Pauses between tries to find and log into a token (see `Token._open`).
_RETRY_PAUSES = (0.0, 0.02, 0.05, 0.1, 0.2)


def _library(module: str) -> Any:
    """Load a PKCS#11 module once per process (C_Initialize may only run once)."""
    with _libraries_lock:
        lib = _libraries.get(module)
        if lib is None:
            if not os.path.exists(module):
                raise CAError(Kind.HSM, f"PKCS#11 module {module!r} does not exist")
            try:
                lib = pkcs11.lib(module)
            except (RuntimeError, OSError) as exc:
                raise CAError(Kind.HSM, f"cannot load PKCS#11 module {module!r}: {exc}") from None
            _libraries[module] = lib
        return lib


def _reinitialize(module: str) -> None:
    """C_Finalize + C_Initialize, after a session could not be opened.

    SoftHSM reads its token directory and the PINs' verifiers only at C_Initialize: a token
    that was removed and is back, or a PIN that was changed and restored, is seen again only
    by a library initialised anew. Every session of the module dies with it, so each Token
    reopens on its next call (see `_generations`). No extra login attempt is made here.
    """
    with _libraries_lock:
        _stale.discard(module)
        lib = _libraries.get(module)
        if lib is None:
            return
        with contextlib.suppress(p11err.PKCS11Error, RuntimeError):
            lib.reinitialize()
        _generations[module] = _generations.get(module, 0) + 1


def _hsm_error(action: str, exc: Exception) -> CAError:
    """Translate a python-pkcs11 exception into a detail an operator can act on."""
    if isinstance(exc, p11err.PinIncorrect):
        return CAError(Kind.HSM, f"{action}: HSM PIN is incorrect")
    if isinstance(exc, p11err.PinLocked):
        return CAError(Kind.HSM, f"{action}: HSM PIN is locked")
    if isinstance(exc, p11err.NoSuchToken | p11err.TokenNotPresent):
        return CAError(Kind.HSM, f"{action}: HSM token not present")
    return CAError(Kind.HSM, f"{action}: HSM error {type(exc).__name__}")


class Token:
    """One PKCS#11 token, with one lazily opened, process-local session.

    The session is reopened in a child process after fork (gunicorn workers) and after a
    failure, so a token that comes back is used again without a restart.
    """

    def __init__(self, module: str, label: str, pin: str) -> None:
        self.module = module
        self.label = label
        self._pin = pin
        self._session: Any = None
        self._pid = 0
        self._generation = 0
        self._lock = threading.RLock()

    def __repr__(self) -> str:  # never show the PIN
        return f"Token(module={self.module!r}, label={self.label!r})"

    def _open(self) -> Any:
        """Find the token and log in, in a session of our own.

        SoftHSM rewrites a token's file at every login and reads it at C_Initialize; a
        process reading it while another one rewrites it (gunicorn workers and the jobs
        process starting together) can see the token missing, or fail the login with
        GeneralError or UserPinNotInitialized. Those are tried again a few times, 20-200 ms
        apart, in a library initialised anew; a wrong PIN is never tried twice (it counts
        towards locking the PIN).
        """
        lib = _library(self.module)
        if self.module in _stale:
            _reinitialize(self.module)
        for pause in (*_RETRY_PAUSES, None):
            try:
                token = lib.get_token(token_label=self.label)
                return self._login(token)
            except (p11err.PinIncorrect, p11err.PinLocked) as exc:
                _stale.add(self.module)  # a PIN changed back is read at the next initialisation
                raise _hsm_error(f"login to HSM token {self.label!r}", exc) from None
            except p11err.NoSuchToken:
                if pause is None:
                    raise CAError(Kind.HSM, f"HSM token {self.label!r} not found") from None
            except p11err.PKCS11Error as exc:
                if pause is None:
                    _stale.add(self.module)
                    raise _hsm_error(f"HSM token {self.label!r}", exc) from None
            # Not found, or the library lost it (removed, then back), or caught mid-rewrite:
            # look again in a library initialised anew. Finding a token logs into nothing.
            time.sleep(pause)
            _reinitialize(self.module)
        raise AssertionError("unreachable")  # the last pass returns or raises

    def _login(self, token: Any) -> Any:
        try:
            return token.open(user_pin=self._pin, rw=True)
        except p11err.UserAlreadyLoggedIn:
            # PKCS#11 login state is per application: another session of this process is
            # already logged in, so a new session shares that login.
            return token.open(rw=True)

    def session(self) -> Any:
        with self._lock:
            generation = _generations.get(self.module, 0)
            if self._session is None or self._pid != os.getpid() or self._generation != generation:
                self._session = None
                self._session = self._open()
                self._pid = os.getpid()
                self._generation = _generations.get(self.module, 0)
            return self._session

    def reset(self) -> None:
        """Forget the session so the next call opens a new one (after an HSM failure)."""
        with self._lock:
            if self._session is not None and self._pid == os.getpid():
                # The session is already unusable; dropping it is the point.
                with contextlib.suppress(p11err.PKCS11Error):
                    self._session.close()
            self._session = None

    def close(self) -> None:
        self.reset()

    def check(self) -> None:
        """Raise CAError unless the token can be logged into and shows its keys (readiness).

        A session opened before the token was removed keeps answering: SoftHSM finds no
        objects in it rather than failing. A ready online token holds its issuers' keys, so
        an empty search means the token is gone; the session is dropped so the next call
        looks for the token anew.
        """
        with self._lock:
            try:
                found = list(self.session().get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY}))
            except p11err.PKCS11Error as exc:
                self.reset()
                raise _hsm_error(f"HSM token {self.label!r}", exc) from None
            if not found:
                self.reset()
                raise CAError(Kind.HSM, f"HSM token {self.label!r} shows no private keys")

    def call(self, action: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Run one PKCS#11 call under the process lock; reset the session if it fails."""
        with self._lock:
            session = self.session()
            try:
                return fn(session, *args, **kwargs)
            except p11err.PKCS11Error as exc:
                self.reset()
                raise _hsm_error(action, exc) from None

    # -- keys -------------------------------------------------------------------------------

    def has_key(self, label: str) -> bool:
        def find(session: Any) -> bool:
            found = list(
                session.get_objects(
                    {Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.LABEL: label}
                )
            )
            return bool(found)

        return bool(self.call(f"look up key {label!r}", find))

    def generate_key(self, label: str, spec: KeySpec) -> HsmPrivateKey:
        """Generate a sensitive, non-extractable key pair on the token under `label`."""
        if self.has_key(label):
            raise CAError(Kind.CONFLICT, f"a key labelled {label!r} already exists on the token")
        private_template = {
            Attribute.EXTRACTABLE: False,
            Attribute.SENSITIVE: True,
            Attribute.SIGN: True,
            Attribute.TOKEN: True,
            Attribute.PRIVATE: True,
        }
        key_id = hashlib.sha256(label.encode()).digest()[:16]

        def generate(session: Any) -> None:
            if spec.algorithm == "ec":
                params = session.create_domain_parameters(
                    KeyType.EC,
                    {Attribute.EC_PARAMS: encode_named_curve_parameters(str(spec.curve_name))},
                    local=True,
                )
                params.generate_keypair(
                    store=True, label=label, id=key_id, private_template=private_template
                )
            else:
                session.generate_keypair(
                    KeyType.RSA,
                    spec.bits,
                    store=True,
                    label=label,
                    id=key_id,
                    private_template=private_template,
                )

        self.call(f"generate key {label!r}", generate)
        return self.key(label)

    def key(self, label: str) -> HsmPrivateKey:
        """The signing key labelled `label`, as a cryptography private-key object."""

        def load(session: Any) -> tuple[Any, Any]:
            try:
                private = session.get_key(object_class=ObjectClass.PRIVATE_KEY, label=label)
                public = session.get_key(object_class=ObjectClass.PUBLIC_KEY, label=label)
            except p11err.NoSuchKey:
                raise CAError(
                    Kind.HSM, f"no key labelled {label!r} on HSM token {self.label!r}"
                ) from None
            if private.key_type == KeyType.EC:
                public_key: Any = serialization.load_der_public_key(encode_ec_public_key(public))
            elif private.key_type == KeyType.RSA:
                public_key = rsa.RSAPublicNumbers(
                    int.from_bytes(public[Attribute.PUBLIC_EXPONENT], "big"),
                    int.from_bytes(public[Attribute.MODULUS], "big"),
                ).public_key()
            else:
                raise CAError(Kind.HSM, f"key {label!r} has an unsupported type")
            return private, public_key

        private, public_key = self.call(f"load key {label!r}", load)
        if isinstance(public_key, ec.EllipticCurvePublicKey):
            return HsmEcPrivateKey(self, label, private, public_key)
        return HsmRsaPrivateKey(self, label, private, public_key)


def _refuse(what: str) -> NoReturn:
    raise CAError(Kind.HSM, f"{what} is not possible: the private key never leaves the HSM")


class HsmEcPrivateKey(ec.EllipticCurvePrivateKey):
    """An EC private key on a PKCS#11 token, signing through `CKM_ECDSA`."""

    def __init__(
        self, token: Token, label: str, handle: Any, public: ec.EllipticCurvePublicKey
    ) -> None:
        self.token = token
        self.label = label
        self._handle = handle
        self._public = public

    def sign(
        self,
        data: bytes | bytearray | memoryview,
        signature_algorithm: ec.EllipticCurveSignatureAlgorithm,
    ) -> bytes:
        if not isinstance(signature_algorithm, ec.ECDSA):
            raise CAError(Kind.HSM, "only ECDSA signatures are supported")
        algorithm = signature_algorithm.algorithm
        if isinstance(algorithm, utils.Prehashed):
            digest = bytes(data)
        else:
            hasher = hashes.Hash(algorithm)
            hasher.update(bytes(data))
            digest = hasher.finalize()
        raw = self.token.call(
            f"sign with key {self.label!r}",
            lambda _session: self._handle.sign(digest, mechanism=Mechanism.ECDSA),
        )
        half = len(raw) // 2
        r = int.from_bytes(raw[:half], "big")
        s = int.from_bytes(raw[half:], "big")
        return utils.encode_dss_signature(r, s)

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._public

    @property
    def curve(self) -> ec.EllipticCurve:
        return self._public.curve

    @property
    def key_size(self) -> int:
        return self._public.key_size

    def exchange(self, algorithm: ec.ECDH, peer_public_key: ec.EllipticCurvePublicKey) -> bytes:
        _refuse("ECDH with an issuer key")

    def private_numbers(self) -> ec.EllipticCurvePrivateNumbers:
        _refuse("reading the private numbers")

    def private_bytes(
        self,
        encoding: serialization.Encoding,
        format: serialization.PrivateFormat,
        encryption_algorithm: serialization.KeySerializationEncryption,
    ) -> bytes:
        _refuse("exporting the private key")

    def __copy__(self) -> HsmEcPrivateKey:
        return self

    def __deepcopy__(self, memo: dict[int, object]) -> HsmEcPrivateKey:
        return self


class HsmRsaPrivateKey(rsa.RSAPrivateKey):
    """An RSA private key on a PKCS#11 token, signing PKCS#1 v1.5 with SHA-2."""

    def __init__(self, token: Token, label: str, handle: Any, public: rsa.RSAPublicKey) -> None:
        self.token = token
        self.label = label
        self._handle = handle
        self._public = public

    def sign(
        self,
        data: bytes | bytearray | memoryview,
        padding_: padding.AsymmetricPadding,
        algorithm: Any,
    ) -> bytes:
        if not isinstance(padding_, padding.PKCS1v15):
            raise CAError(Kind.HSM, "only PKCS#1 v1.5 RSA signatures are supported")
        if not isinstance(algorithm, hashes.HashAlgorithm) or algorithm.name not in _RSA_MECHANISMS:
            raise CAError(Kind.HSM, "RSA signing needs SHA-256, SHA-384 or SHA-512")
        mechanism = _RSA_MECHANISMS[algorithm.name]
        payload = bytes(data)
        result: bytes = self.token.call(
            f"sign with key {self.label!r}",
            lambda _session: self._handle.sign(payload, mechanism=mechanism),
        )
        return result

    def public_key(self) -> rsa.RSAPublicKey:
        return self._public

    @property
    def key_size(self) -> int:
        return self._public.key_size

    def decrypt(self, ciphertext: bytes, padding: padding.AsymmetricPadding) -> bytes:
        _refuse("decrypting with an issuer key")

    def private_numbers(self) -> rsa.RSAPrivateNumbers:
        _refuse("reading the private numbers")

    def private_bytes(
        self,
        encoding: serialization.Encoding,
        format: serialization.PrivateFormat,
        encryption_algorithm: serialization.KeySerializationEncryption,
    ) -> bytes:
        _refuse("exporting the private key")

    def __copy__(self) -> HsmRsaPrivateKey:
        return self

    def __deepcopy__(self, memo: dict[int, object]) -> HsmRsaPrivateKey:
        return self


HsmPrivateKey = HsmEcPrivateKey | HsmRsaPrivateKey


def signature_hash(
    key: HsmPrivateKey | ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey,
) -> hashes.SHA256 | hashes.SHA384:
    """The hash an issuer key signs with: SHA-384 for P-384, otherwise SHA-256."""
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size == 384:
        return hashes.SHA384()
    return hashes.SHA256()
