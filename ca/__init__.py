"""certwright's CA core: keys behind PKCS#11, issuance, policy, storage, CRLs, ceremony, CLI.

This package imports neither `acme` nor `ocsp`; both of those build on it.
"""
