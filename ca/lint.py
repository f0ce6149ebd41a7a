"""pkilint, loaded once per process: certificates, chains, CRLs and OCSP responses.

Building pkilint's validator trees is far costlier than running them, and linting is already the
largest share of the issuance path (~3.4 ms of ~4 ms per certificate, DESIGN.md §6), so each
tree is built on first use and kept.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import re
import threading
from typing import Any

from ca.errors import CAError, Kind

_lock = threading.Lock()


def _memoize_dispatch(container: Any) -> Any:
    """Make a pkilint validator tree pick its validators per node by lookup, not by trial.

    pkilint asks every validator of a container whether it matches every node below it
    (`ValidatorContainer._validate_rec`): thousands of `match()` calls per certificate, half of
    the lint's cost. pkilint's stock `NodeVisitor.match()`, for a validator with neither a
    predicate nor a supertype test, depends only on the node's path and the Python type of its
    value, and our certificates repeat the same paths; so that answer is computed once per
    (path, type) and kept. A validator with its own `match()` that starts from
    `super().match(node)` (every one in pkilint does) is skipped where the stock answer is no,
    and asked where it is yes; any other validator is asked every time. The findings are
    identical: tests/unit/test_lint.py compares them with stock pkilint's.
    """
    from pkilint.document import NodeVisitor
    from pkilint.validation import ValidatorContainer

    stock_match = NodeVisitor.match
    fixed, prefiltered, live = 0, 1, 2

    def kind(validator: Any) -> int:
        if (
            getattr(validator, "_predicate", None) is not None
            or getattr(validator, "_pdu_supertype", None) is not None
        ):
            return live
        match = type(validator).match
        if match is stock_match:
            return fixed
        try:
            source = inspect.getsource(match)
        except (OSError, TypeError):
            return live
        return prefiltered if "super().match(node)" in source else live

    def patch(node: Any) -> None:
        if not isinstance(node, ValidatorContainer) or "_validate_rec" in vars(node):
            return
        plans: dict[tuple[str, type], list[tuple[Any, bool]]] = {}
        validators = [(v, kind(v)) for v in node.validators]

        def validate_rec(pdu_node: Any, results: list[Any]) -> None:
            key = (pdu_node.path, type(pdu_node.pdu))
            plan = plans.get(key)
            if plan is None:
                # (validator, ask it each time?) for every validator that may match here.
                plan = [
                    (v, k != fixed) for v, k in validators if k == live or stock_match(v, pdu_node)
                ]
                plans[key] = plan
            for validator, ask in plan:
                if ask and not validator.match(pdu_node):
                    continue
                result = validator.validate_wrapper(pdu_node)
                if isinstance(result, list):
                    results += result
                else:
                    results.append(result)
            for child in pdu_node.children.values():
                validate_rec(child, results)

        node._validate_rec = validate_rec
        for child, _ in validators:
            patch(child)

    patch(container)
    return container


_DECODE_CACHE_MAX_BYTES = 512
_DECODE_CACHE_ENTRIES = 4096


@functools.cache
def _cache_small_decodes() -> None:
    """Decode each small DER value (an extension, a name attribute, key parameters) once.

    Certificates from one issuer and profile carry byte-identical AIA, CRL distribution point,
    AKI, EKU, KeyUsage and BasicConstraints values, and pkilint decodes each of them into a
    pyasn1 object on every lint: a third of the decoding time. pkilint's nodes only read the
    decoded objects, so the same object can back the nodes of many documents. Whole documents
    and large values are decoded every time; the cache is cleared when it fills. Runs under
    `_lock`, like every lint.
    """
    from pkilint import document

    original = document.decode_der
    cache: dict[tuple[bytes, int], Any] = {}

    def decode_der(substrate: Any, asn1Spec: Any = None) -> Any:
        if len(substrate) > _DECODE_CACHE_MAX_BYTES:
            return original(substrate, asn1Spec=asn1Spec)
        key = (bytes(substrate), id(asn1Spec))
        decoded = cache.get(key)
        if decoded is None:
            decoded = original(substrate, asn1Spec=asn1Spec)
            if len(cache) >= _DECODE_CACHE_ENTRIES:
                cache.clear()
            cache[key] = decoded
        return decoded

    document.decode_der = decode_der


@dataclasses.dataclass(frozen=True)
class Finding:
    severity: str  # "FATAL" | "ERROR" | "WARNING" | "NOTICE" | "INFO"
    code: str
    path: str
    message: str | None = None

    def __str__(self) -> str:
        text = f"{self.severity} {self.code} at {self.path}"
        return f"{text}: {self.message}" if self.message else text


def _findings(results: Any) -> list[Finding]:
    out: list[Finding] = []
    for result in results:
        for description in result.finding_descriptions:
            out.append(
                Finding(
                    severity=description.finding.severity.name,
                    code=description.finding.code,
                    path=result.node.path,
                    message=description.message,
                )
            )
    return out


_WILDCARD_FINDING = re.compile(r'^Invalid domain name syntax: "\*\.(?P<base>[^"]+)"$')


def is_wildcard_name_finding(finding: Finding) -> bool:
    """pkilint's RFC 5280 profile checks dNSName against the preferred name syntax, which has
    no wildcard; RFC 5280 §4.2.1.6 leaves wildcards out of scope and RFC 9525 §6.3 defines
    them (one leftmost `*` label). Such a finding is tolerated when the name after `*.` passes
    the very same pkilint syntax check; any other domain-name finding still refuses."""
    if finding.code != "pkix.invalid_domain_name_syntax" or not finding.message:
        return False
    match = _WILDCARD_FINDING.match(finding.message)
    if match is None:
        return False
    from pkilint.pkix.general_name import validators_predicate
    from validators import domain

    return bool(validators_predicate(domain, match.group("base")))


def errors(findings: list[Finding]) -> list[Finding]:
    """Findings of severity ERROR or worse: each of these refuses what was linted."""
    return [
        f for f in findings if f.severity in ("FATAL", "ERROR") and not is_wildcard_name_finding(f)
    ]


@functools.cache
def _certificate_validator() -> Any:
    from pkilint.pkix import certificate, extension, name

    return _memoize_dispatch(
        certificate.create_pkix_certificate_validator_container(
            certificate.create_decoding_validators(
                name.ATTRIBUTE_TYPE_MAPPINGS, extension.EXTENSION_MAPPINGS
            ),
            [
                certificate.create_issuer_validator_container([]),
                certificate.create_validity_validator_container(),
                certificate.create_subject_validator_container([]),
                certificate.create_extensions_validator_container([]),
                certificate.create_spki_validator_container([]),
            ],
        )
    )


@functools.cache
def _crl_validator(arl: bool, br: bool) -> Any:
    from pkilint import pkix
    from pkilint.cabf import cabf_crl
    from pkilint.pkix import crl, extension, name

    crl_type = (
        crl.CertificateRevocationListType.ARL if arl else crl.CertificateRevocationListType.CRL
    )
    validity: list[Any] = []
    document: list[Any] = []
    if br:
        document.append(cabf_crl.CabfCrlReasonCodeAllowlistValidator(crl_type))
        validity.append(cabf_crl.create_validity_period_validator(crl_type))
    return crl.create_pkix_crl_validator_container(
        [
            pkix.create_attribute_decoder(name.ATTRIBUTE_TYPE_MAPPINGS),
            pkix.create_extension_decoder(extension.EXTENSION_MAPPINGS),
        ],
        [
            crl.create_issuer_validator_container([]),
            crl.create_validity_validator_container(validity),
            crl.create_extensions_validator_container([]),
            *document,
        ],
    )


@functools.cache
def _ocsp_validator() -> Any:
    from pkilint import pkix
    from pkilint.pkix import extension, name, ocsp

    return ocsp.create_pkix_ocsp_response_validator_container(
        [
            ocsp.create_response_decoder(),
            pkix.create_attribute_decoder(name.ATTRIBUTE_TYPE_MAPPINGS),
            pkix.create_extension_decoder(extension.EXTENSION_MAPPINGS),
        ],
        [],
    )


@functools.cache
def _chain_validators() -> tuple[Any, Any, Any]:
    from pkilint import document, pkix, validation
    from pkilint.pkix import algorithm, certificate, extension, key, name
    from pkilint.pkix.certificate import certificate_extension, certificate_key
    from pyasn1_alt_modules import rfc5280

    decoders = validation.ValidatorContainer(
        validators=[
            pkix.create_attribute_decoder(name.ATTRIBUTE_TYPE_MAPPINGS),
            pkix.create_extension_decoder(extension.EXTENSION_MAPPINGS),
            pkix.create_signature_algorithm_identifier_decoder(
                algorithm.SIGNATURE_ALGORITHM_IDENTIFIER_MAPPINGS,
                path="certificate.tbsCertificate.signature",
            ),
            certificate.create_spki_decoder(
                key.SUBJECT_PUBLIC_KEY_ALGORITHM_IDENTIFIER_MAPPINGS,
                key.SUBJECT_KEY_PARAMETER_ALGORITHM_IDENTIFIER_MAPPINGS,
            ),
        ],
        path="certificate",
    )
    issuer = validation.ValidatorContainer(
        validators=[
            name.IssuerSubjectNameBinaryEqualValidator(
                path="certificate.tbsCertificate.subject",
                subject_document_issuer_dn_path="subject:certificate.tbsCertificate.issuer",
            ),
            extension.IssuerSubjectKeyIdentifierBinaryEqualValidator(
                subject_auth_key_id_retriever=(
                    lambda n: document.get_document_by_name(n, "subject").get_extension_by_oid(
                        rfc5280.id_ce_authorityKeyIdentifier
                    )
                )
            ),
            certificate_extension.IssuerSubjectPolicyChainValidator(),
        ]
    )
    subject = validation.ValidatorContainer(
        validators=[
            certificate_key.SubjectSignatureVerificationValidator(
                tbs_node_retriever=lambda n: n.navigate("^.tbsCertificate"),
                path="certificate.signature",
            )
        ]
    )
    return decoders, issuer, subject


@functools.cache
def _loader(loader_cls_name: str) -> Any:
    from pkilint import loader

    return getattr(loader, loader_cls_name)()


def _load(
    loader_cls_name: str, der: bytes, name: str, collection: dict[str, Any] | None = None
) -> Any:
    loader_obj = _loader(loader_cls_name)
    try:
        if collection is None:
            return loader_obj.load_der_document(der, name)
        return loader_obj.load_der_document(der, name, name, collection)
    except Exception as exc:  # pyasn1 raises its own PyAsn1Error, not a ValueError
        raise CAError(Kind.LINT, f"pkilint cannot decode the {name}: {exc}") from None


def warm_up() -> None:
    """Build the validator trees now rather than on the first request."""
    _cache_small_decodes()
    _certificate_validator()
    _crl_validator(False, False)
    _ocsp_validator()


def lint_certificate(der: bytes) -> list[Finding]:
    """RFC 5280 certificate lint (pkilint's `lint_pkix_cert`)."""
    with _lock:
        _cache_small_decodes()
        validator = _certificate_validator()
        document = _load("RFC5280CertificateDocumentLoader", der, "certificate")
        return _findings(validator.validate(document.root))


def lint_chain(issuer_der: bytes, subject_der: bytes) -> list[Finding]:
    """Issuer/subject pair lint (pkilint's `lint_pkix_signer_signee_cert_chain`)."""
    with _lock:
        decoders, issuer_v, subject_v = _chain_validators()
        collection: dict[str, Any] = {}
        issuer = _load("RFC5280CertificateDocumentLoader", issuer_der, "issuer", collection)
        collection["issuer"] = issuer
        subject = _load("RFC5280CertificateDocumentLoader", subject_der, "subject", collection)
        collection["subject"] = subject
        results = decoders.validate(issuer.root) + decoders.validate(subject.root)
        results += issuer_v.validate(issuer.root) + subject_v.validate(subject.root)
        return _findings(results)


def lint_crl(der: bytes, *, arl: bool = False, br: bool = False) -> list[Finding]:
    """RFC 5280 CRL lint (pkilint's `lint_crl -t CRL|ARL -p PKIX|BR`)."""
    with _lock:
        validator = _crl_validator(arl, br)
        document = _load("RFC5280CertificateListDocumentLoader", der, "CRL")
        return _findings(validator.validate(document.root))


def lint_ocsp_response(der: bytes) -> list[Finding]:
    """RFC 6960 OCSP response lint (pkilint's `lint_ocsp_response`)."""
    with _lock:
        validator = _ocsp_validator()
        document = _load("RFC6960OCSPResponseDocumentLoader", der, "OCSP response")
        return _findings(validator.validate(document.root))


def require_clean(findings: list[Finding], what: str) -> None:
    """Refuse (CAError LINT, rule `lint.<code>`) when pkilint reported an ERROR or worse."""
    bad = errors(findings)
    if bad:
        raise CAError(
            Kind.LINT,
            f"pkilint refused the {what}: " + "; ".join(str(f) for f in bad[:3]),
            rule=f"lint.{bad[0].code}",
        )
