"""Archived ledger segments: records moved out of the database into a bundle file.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"


def upgrade() -> None:
    op.create_table(
        "ledger_archives",
        sa.Column("chain", sa.String(200), primary_key=True),
        sa.Column("through_seq", sa.BigInteger, primary_key=True),
        sa.Column("first_seq", sa.BigInteger, nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
        sa.Column("file", sa.Text, nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("archived_at", sa.String(40), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("ledger_archives")
