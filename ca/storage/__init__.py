"""Storage: the typed schema (models) and the one interface to it (store)."""

from ca.storage.store import (
    CertificateFilter,
    CertificateRecord,
    IssuerRecord,
    OnRecord,
    Reservation,
    Storage,
)

__all__ = [
    "CertificateFilter",
    "CertificateRecord",
    "IssuerRecord",
    "OnRecord",
    "Reservation",
    "Storage",
]
