"""cross certificates

An intermediate certified by a second root (a root rotation, or a second trust anchor): same
subject and key, another parent. ACME offers the chain through each as an alternate
(RFC 8555 §7.4.2); the signing root's ARL lists it when the intermediate is revoked.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-02 10:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import ca.storage.models

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "cross_certificates",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("issuer_id", sa.String(length=64), nullable=False),
        sa.Column("parent_id", sa.String(length=64), nullable=False),
        sa.Column("serial", sa.String(length=48), nullable=False),
        sa.Column("cert_der", sa.LargeBinary(), nullable=False),
        sa.Column("not_before", ca.storage.models.UTCDateTime(), nullable=False),
        sa.Column("not_after", ca.storage.models.UTCDateTime(), nullable=False),
        sa.Column("created_at", ca.storage.models.UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(["issuer_id"], ["issuers.id"]),
        sa.ForeignKeyConstraint(["parent_id"], ["issuers.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("serial"),
    )
    with op.batch_alter_table("cross_certificates", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_cross_certificates_issuer_id"), ["issuer_id"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_cross_certificates_parent_id"), ["parent_id"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("cross_certificates", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_cross_certificates_parent_id"))
        batch_op.drop_index(batch_op.f("ix_cross_certificates_issuer_id"))
    op.drop_table("cross_certificates")
