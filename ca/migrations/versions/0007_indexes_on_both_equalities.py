"""indexes on both equality columns of two hot look-ups

Without table statistics SQLite's planner picked a status index for "the valid challenge of
this authorization" and "a revoked certificate with this key", walking every valid challenge
or revoked certificate ever recorded. An index on both columns is the one it picks.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01 21:30:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("acme_challenges", schema=None) as batch_op:
        batch_op.drop_index("ix_acme_challenges_authorization_id")
        batch_op.create_index(
            "ix_acme_challenges_authorization_status", ["authorization_id", "status"], unique=False
        )
    with op.batch_alter_table("certificates", schema=None) as batch_op:
        batch_op.drop_index("ix_certificates_spki_sha256")
        batch_op.create_index(
            "ix_certificates_spki_status", ["spki_sha256", "status"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("certificates", schema=None) as batch_op:
        batch_op.drop_index("ix_certificates_spki_status")
        batch_op.create_index("ix_certificates_spki_sha256", ["spki_sha256"], unique=False)
    with op.batch_alter_table("acme_challenges", schema=None) as batch_op:
        batch_op.drop_index("ix_acme_challenges_authorization_status")
        batch_op.create_index(
            "ix_acme_challenges_authorization_id", ["authorization_id"], unique=False
        )
