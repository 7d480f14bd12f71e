"""People who log in to the panel: users (password hash, role, lockout, TOTP), their
single-use TOTP backup codes, and the lockout counters of names without an account.

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"


def upgrade() -> None:
    op.create_table(
        "users",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("username", sa.String(64), nullable=False, unique=True),
        sa.Column("password_hash", sa.String(200), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("must_change_password", sa.Boolean, nullable=False),
        sa.Column("password_changed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_login_at", sa.DateTime(timezone=True), nullable=True),
        # Lockout: failures since the last success or lockout, lockouts in a row.
        sa.Column("failed_attempts", sa.Integer, nullable=False),
        sa.Column("lockouts", sa.Integer, nullable=False),
        sa.Column("locked_until", sa.DateTime(timezone=True), nullable=True),
        # SHA-256 of a one-time password-reset token (the token itself is never stored).
        sa.Column("reset_token_hash", sa.String(64), nullable=True),
        sa.Column("reset_token_expires", sa.DateTime(timezone=True), nullable=True),
        # SHA-256 of the token that links a login's password step to its TOTP step.
        sa.Column("login_challenge_hash", sa.String(64), nullable=True),
        sa.Column("login_challenge_expires", sa.DateTime(timezone=True), nullable=True),
        # TOTP secrets encrypted with the keyring; the pending one awaits its first code.
        sa.Column("totp_secret", sa.LargeBinary, nullable=True),
        sa.Column("totp_pending", sa.LargeBinary, nullable=True),
        sa.Column("totp_enrolled_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("totp_last_step", sa.BigInteger, nullable=True),
        sa.CheckConstraint("role IN ('admin', 'operator', 'viewer')", name="ck_users_role"),
    )
    op.create_table(
        "user_backup_codes",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("user_id", sa.Integer, sa.ForeignKey("users.id", ondelete="CASCADE"),
                  nullable=False),
        sa.Column("code_hash", sa.String(200), nullable=False),
        sa.Column("used_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_index("ix_user_backup_codes_user", "user_backup_codes", ["user_id"])
    # The same lockout counters for names that have no account (keyed by the SHA-256 of the
    # name), so that a login answers an unknown name exactly as it answers a wrong password.
    op.create_table(
        "login_throttle",
        sa.Column("key", sa.String(64), primary_key=True),
        sa.Column("failed_attempts", sa.Integer, nullable=False),
        sa.Column("lockouts", sa.Integer, nullable=False),
        sa.Column("locked_until", sa.DateTime(timezone=True), nullable=True),
    )


def downgrade() -> None:
    op.drop_table("login_throttle")
    op.drop_index("ix_user_backup_codes_user", "user_backup_codes")
    op.drop_table("user_backup_codes")
    op.drop_table("users")
