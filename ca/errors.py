"""The one internal error type of the CA core.

Anything in `ca/` that refuses or fails raises `CAError` with a `Kind` and a detail that is safe
to show to whoever asked (it never carries a traceback, a PIN or a SQL statement). The ACME edge
maps kinds to `urn:ietf:params:acme:error:*` problems; the CLI maps them to one stderr line and
an exit code. Both mappings live at their edge, nowhere else.
"""

from __future__ import annotations

import enum


class Kind(enum.Enum):
    """What went wrong, in terms a caller can act on."""

    BAD_CSR = "badCSR"  # unparseable CSR, bad signature, weak or unapproved key or hash
    POLICY = "policy"  # the request breaks a profile rule (names, lifetime, key type)
    BAD_REQUEST = "badRequest"  # malformed input other than a CSR (serial, duration, ...)
    NOT_FOUND = "notFound"
    ALREADY_REVOKED = "alreadyRevoked"
    BAD_REVOCATION_REASON = "badRevocationReason"
    LINT = "lint"  # pkilint found an ERROR in the to-be-signed certificate
    HSM = "hsm"  # the token is missing, locked, or refused to sign
    CONFIG = "config"  # configuration file or values are wrong
    STORAGE = "storage"  # the database is unreachable or refused a write
    CONFLICT = "conflict"  # a uniqueness rule in the database (issuer name, serial) was hit
    INTERNAL = "internal"


class CAError(Exception):
    """A refusal or failure of the CA core: a kind plus a detail safe to show."""

    def __init__(self, kind: Kind, detail: str, *, rule: str | None = None) -> None:
        super().__init__(detail)
        self.kind = kind
        self.detail = detail
        # The policy rule that refused, e.g. "key.rsa_min_bits"; refusals name their rule so an
        # admin can find it in the profile and metrics can count refusals per rule.
        self.rule = rule

    def __str__(self) -> str:
        return self.detail
