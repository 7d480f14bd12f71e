"""The panel: login sessions (the cookie's SHA-256, never the cookie) and API tokens for
scripts (shown once, kept as a SHA-256 and a prefix to tell them apart). Both belong to a
user row and go with it: a name removed and given again does not inherit them.

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"


def upgrade() -> None:
    op.create_table(
        "panel_sessions",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("user_id", sa.Integer, sa.ForeignKey("users.id", ondelete="CASCADE"),
                  nullable=False),
        # Why the session may do nothing but one step: change_password, enrol_totp; or NULL.
        sa.Column("restricted", sa.String(32), nullable=True),
        sa.Column("second_factor", sa.String(16), nullable=True),  # totp, backup_code
        sa.Column("source", sa.String(64), nullable=False),
        sa.Column("user_agent", sa.String(200), nullable=False),
        sa.Column("created_at", sa.String(40), nullable=False),
        sa.Column("last_seen_at", sa.String(40), nullable=False),
        sa.Column("expires_at", sa.String(40), nullable=False),
        sa.Column("revoked_at", sa.String(40), nullable=True),
    )
    op.create_index("ix_panel_sessions_user", "panel_sessions", ["user_id"])
    op.create_table(
        "panel_tokens",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("user_id", sa.Integer, sa.ForeignKey("users.id", ondelete="CASCADE"),
                  nullable=False),
        sa.Column("label", sa.String(200), nullable=False),
        sa.Column("scope", sa.String(16), nullable=False),  # a role, at most the owner's
        sa.Column("prefix", sa.String(16), nullable=False),
        sa.Column("hash", sa.String(64), nullable=False, unique=True),
        sa.Column("created_at", sa.String(40), nullable=False),
        sa.Column("last_used_at", sa.String(40), nullable=True),
        sa.Column("revoked_at", sa.String(40), nullable=True),
    )
    op.create_index("ix_panel_tokens_user", "panel_tokens", ["user_id"])


def downgrade() -> None:
    op.drop_table("panel_tokens")
    op.drop_table("panel_sessions")
