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
    the lint's cost. pkilint's stock `NodeVisitor.match()` tests, in order, the node's path
    (`path`, `path_re`), the Python type of its value (`pdu_class`), `pdu_supertype` and a
    `predicate`; the first three depend only on the node's path and the type of its value, and
    our certificates repeat the same paths; so that part of the answer is computed once per
    (path, type) and kept. Then, per validator, only what is left is asked at each node:

    - nothing, for a validator with the stock `match()` and neither predicate nor supertype;
    - its predicate, for one with the stock `match()` and a predicate (no supertype);
    - the extension's OID, for pkilint's `ExtensionCriticalityValidator.match()` (the stock
      test, then `_type_oid == node.children["extnID"].pdu`), read once per node;
    - the type node's value, for pkilint's `TypeMatchingValidator.match()` (the stock test,
      then `node.navigate(type_path).pdu == type_oid`), with the navigation done directly for
      a plain relative path, and by `match()` itself whenever it fails or the path is unusual;
    - `match()` itself, for any other validator with its own `match()`: where the stock answer
      is no, only if it does not start from `super().match(node)` (every one in pkilint does).

    The findings, and their order, are identical: tests/unit/test_lint.py compares them with
    stock pkilint's.
    """
    from pkilint.document import NodeVisitor
    from pkilint.pkix.extension import ExtensionCriticalityValidator
    from pkilint.validation import TypeMatchingValidator, ValidatorContainer
    from pyasn1.type import univ

    stock_match = NodeVisitor.match
    extension_match = ExtensionCriticalityValidator.match
    type_match = TypeMatchingValidator.match
    # What a plan asks of a validator at each node, once the stock path/type test said yes.
    run, ask, predicate, extension, typed = range(5)
    # How a validator's stock path/type test is used: given per (path, type), or not at all.
    static, dynamic = 0, 1

    def static_match(validator: Any, node: Any) -> bool:
        """NodeVisitor.match() without its supertype and predicate tests."""
        path = validator._path
        if path is not None and path != node.path:
            return False
        path_re = validator._path_re
        if path_re is not None and path_re.match(node.path) is None:
            return False
        pdu_class = validator._pdu_class
        return pdu_class is None or isinstance(node.pdu, pdu_class)

    def classify(validator: Any) -> tuple[int, int, Any]:
        """(what to ask, how the static test is used, what the question needs)."""
        match = type(validator).match
        has_predicate = getattr(validator, "_predicate", None) is not None
        if getattr(validator, "_pdu_supertype", None) is not None:
            return ask, dynamic, None
        if match is stock_match:
            return (predicate if has_predicate else run), static, None
        if has_predicate:
            return ask, dynamic, None
        if match is extension_match:
            oid: Any = getattr(validator, "_type_oid", None)
            if type(oid) is univ.ObjectIdentifier and oid.isValue:
                return extension, static, oid.asTuple()
        if match is type_match:
            path = getattr(validator, "type_path", None)
            if isinstance(path, str) and ":" not in path and all(path.split(".")):
                return typed, static, tuple(path.split("."))
        try:
            source = inspect.getsource(match)
        except (OSError, TypeError):
            return ask, dynamic, None
        return ask, (static if "super().match(node)" in source else dynamic), None

    def navigate(node: Any, parts: tuple[str, ...]) -> Any:
        """PDUNode.navigate() for a relative path without a document name."""
        for part in parts:
            node = node.parent if part == "^" else node.children[part]
        return node

    def extension_oid(node: Any) -> tuple[int, ...] | None:
        """The node's extnID as a tuple, or None to ask `match()` itself."""
        try:
            oid = node.children["extnID"].pdu
        except (KeyError, AttributeError):
            return None
        if type(oid) is not univ.ObjectIdentifier or not oid.isValue:
            return None
        return oid.asTuple()  # type: ignore[no-any-return]

    def patch(node: Any) -> None:
        if not isinstance(node, ValidatorContainer) or "_validate_rec" in vars(node):
            return
        plans: dict[tuple[str, type], tuple[tuple[Any, int, Any], ...]] = {}
        validators = [(v, *classify(v)) for v in node.validators]

        def validate_rec(pdu_node: Any, results: list[Any]) -> None:
            key = (pdu_node.path, type(pdu_node.pdu))
            plan = plans.get(key)
            if plan is None:
                plan = tuple(
                    (v, question, extra)
                    for v, question, use, extra in validators
                    if use == dynamic or static_match(v, pdu_node)
                )
                plans[key] = plan
            if plan:
                node_oid: Any = False  # not read yet
                for validator, question, extra in plan:
                    if question == ask:
                        if not validator.match(pdu_node):
                            continue
                    elif question == predicate:
                        if not validator._predicate(pdu_node):
                            continue
                    elif question == extension:
                        if node_oid is False:
                            node_oid = extension_oid(pdu_node)
                        if node_oid is None:
                            if not validator.match(pdu_node):
                                continue
                        elif extra != node_oid:
                            continue
                    elif question == typed:
                        try:
                            type_value = navigate(pdu_node, extra).pdu
                        except (KeyError, AttributeError):
                            if not validator.match(pdu_node):  # raises as pkilint would
                                continue
                        else:
                            # `==`, exactly as TypeMatchingValidator.match() compares.
                            matched = type_value == validator.type_oid
                            if not matched:
                                continue
                    result = validator.validate_wrapper(pdu_node)
                    if isinstance(result, list):
                        results += result
                    else:
                        results.append(result)
            for child in pdu_node.children.values():
                validate_rec(child, results)

        node._validate_rec = validate_rec
        for child, *_ in validators:
            patch(child)

    patch(container)
    return container


_VALUE_RESULTS_ENTRIES = 4096


def _memoize_name_syntax(container: Any) -> Any:
    """Check each distinct name or URI string once per validator, not once per certificate.

    pkilint's syntax checks of a URI, domain name or e-mail address (`validators.url()` and
    friends: 50 µs a URI) read nothing but the string value of the node and whether the node
    lies below a NameConstraints extension; our certificates repeat the same AIA and CRL URLs.
    So for these validators, by exact class, the findings are kept per (validator, value type,
    value, below NameConstraints) and given again, for the node at hand, when all three recur.
    Outcomes from an unexpected exception are not kept. Runs under `_lock`, like every lint.
    """
    from pkilint.pkix import general_name
    from pkilint.validation import ValidationResult, Validator, ValidatorContainer

    memoized = {
        general_name.UriSyntaxValidator,
        general_name.DomainNameSyntaxValidator,
        general_name.MailboxAddressSyntaxValidator,
        general_name.GeneralNameUriSyntaxValidator,
        general_name.GeneralNameDnsNameSyntaxValidator,
        general_name.GeneralNameMailboxAddressSyntaxValidator,
    }
    unhandled = Validator.VALIDATION_FINDING_UNHANDLED_EXCEPTION
    in_name_constraints = general_name.is_nameconstraints_child_node

    def memoize(validator: Any) -> None:
        if "validate_wrapper" in vars(validator):
            return
        stock = validator.validate_wrapper
        outcomes: dict[tuple[type, str, bool], tuple[Any, ...]] = {}

        def validate_wrapper(node: Any) -> Any:
            try:
                key = (type(node.pdu), str(node.pdu), in_name_constraints(node))
            except Exception:  # the validator meets the same failure and reports it
                return stock(node)
            findings = outcomes.get(key)
            if findings is not None:
                return ValidationResult(validator, node, list(findings))
            result = stock(node)
            if (
                isinstance(result, ValidationResult)
                and result.validator is validator
                and result.node is node
                and all(d.finding is not unhandled for d in result.finding_descriptions)
            ):
                if len(outcomes) >= _VALUE_RESULTS_ENTRIES:
                    outcomes.clear()
                outcomes[key] = tuple(result.finding_descriptions)
            return result

        validator.validate_wrapper = validate_wrapper

    def walk(node: Any) -> None:
        if type(node) in memoized:
            memoize(node)
        if isinstance(node, ValidatorContainer):
            for child in node.validators:
                walk(child)

    walk(container)
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
    return _memoize_dispatch(_memoize_name_syntax(stock_certificate_validator()))


def stock_certificate_validator() -> Any:
    """pkilint's RFC 5280 certificate validator as pkilint builds it, new at each call (the
    tests compare ours with it)."""
    from pkilint.pkix import certificate, extension, name

    return certificate.create_pkix_certificate_validator_container(
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


def _dismantle(*documents: Any) -> None:
    """Break the reference cycles of linted documents (node <-> parent, node <-> document) so
    that they are freed at once rather than by the cyclic collector: ~150 nodes a certificate,
    whose collection cost a sixth of the lint time. Only after the findings are taken."""
    for document in documents:
        stack = [document.root] if document.root is not None else []
        document.root = None
        while stack:
            node = stack.pop()
            stack.extend(node.children.values())
            node.children = {}
            node.parent = None
            node.document = None


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
        try:
            return _findings(validator.validate(document.root))
        finally:
            _dismantle(document)


def lint_chain(issuer_der: bytes, subject_der: bytes) -> list[Finding]:
    """Issuer/subject pair lint (pkilint's `lint_pkix_signer_signee_cert_chain`)."""
    with _lock:
        decoders, issuer_v, subject_v = _chain_validators()
        collection: dict[str, Any] = {}
        issuer = _load("RFC5280CertificateDocumentLoader", issuer_der, "issuer", collection)
        collection["issuer"] = issuer
        subject = _load("RFC5280CertificateDocumentLoader", subject_der, "subject", collection)
        collection["subject"] = subject
        try:
            results = decoders.validate(issuer.root) + decoders.validate(subject.root)
            results += issuer_v.validate(issuer.root) + subject_v.validate(subject.root)
            return _findings(results)
        finally:
            _dismantle(issuer, subject)


def lint_crl(der: bytes, *, arl: bool = False, br: bool = False) -> list[Finding]:
    """RFC 5280 CRL lint (pkilint's `lint_crl -t CRL|ARL -p PKIX|BR`)."""
    with _lock:
        validator = _crl_validator(arl, br)
        document = _load("RFC5280CertificateListDocumentLoader", der, "CRL")
        try:
            return _findings(validator.validate(document.root))
        finally:
            _dismantle(document)


def lint_ocsp_response(der: bytes) -> list[Finding]:
    """RFC 6960 OCSP response lint (pkilint's `lint_ocsp_response`)."""
    with _lock:
        validator = _ocsp_validator()
        document = _load("RFC6960OCSPResponseDocumentLoader", der, "OCSP response")
        try:
            return _findings(validator.validate(document.root))
        finally:
            _dismantle(document)


def require_clean(findings: list[Finding], what: str) -> None:
    """Refuse (CAError LINT, rule `lint.<code>`) when pkilint reported an ERROR or worse."""
    bad = errors(findings)
    if bad:
        raise CAError(
            Kind.LINT,
            f"pkilint refused the {what}: " + "; ".join(str(f) for f in bad[:3]),
            rule=f"lint.{bad[0].code}",
        )
