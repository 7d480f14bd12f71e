"""The execution service: intents seen (dedupe), orders, positions, and the outbox of trade
events kept until the trade logger confirms them. Quantities and prices are exact decimal
strings.

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"


def upgrade() -> None:
    op.create_table(
        "execution_intents",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("account", sa.String(64), nullable=False),
        sa.Column("key", sa.String(64), nullable=False),
        sa.Column("symbol", sa.String(64), nullable=False),
        sa.Column("bar_ts", sa.String(40), nullable=False),
        # waiting (for the halt state), ordered, noop, refused
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("data", sa.Text, nullable=False),  # the intent as received
        sa.Column("received_at", sa.String(40), nullable=False),
        sa.UniqueConstraint("account", "key", name="uq_execution_intents_key"),
    )
    op.create_index("ix_execution_intents_status", "execution_intents", ["account", "status"])
    op.create_table(
        "execution_orders",
        sa.Column("client_order_id", sa.String(36), primary_key=True),
        sa.Column("account", sa.String(64), nullable=False),
        sa.Column("intent_key", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),  # intent, flatten
        sa.Column("strategy_id", sa.String(128), nullable=False),
        sa.Column("exchange", sa.String(64), nullable=False),
        sa.Column("symbol", sa.String(64), nullable=False),
        sa.Column("timeframe", sa.String(8), nullable=True),
        sa.Column("side", sa.String(4), nullable=False),
        sa.Column("qty", sa.String(80), nullable=False),
        sa.Column("filled", sa.String(80), nullable=False),
        sa.Column("avg_price", sa.String(80), nullable=True),
        sa.Column("fee", sa.String(80), nullable=False),
        sa.Column("fee_currency", sa.String(32), nullable=True),
        sa.Column("fills", sa.Integer, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("exchange_order_id", sa.String(128), nullable=True),
        sa.Column("cancel_requested", sa.Boolean, nullable=False),
        sa.Column("fill_after", sa.String(40), nullable=True),
        sa.Column("created_at", sa.String(40), nullable=False),
        sa.Column("updated_at", sa.String(40), nullable=False),
    )
    op.create_index("ix_execution_orders_status", "execution_orders", ["account", "status"])
    op.create_index("ix_execution_orders_intent", "execution_orders", ["account", "intent_key"])
    op.create_table(
        "execution_positions",
        sa.Column("account", sa.String(64), primary_key=True),
        sa.Column("symbol", sa.String(64), primary_key=True),
        sa.Column("exchange", sa.String(64), nullable=False),
        sa.Column("qty", sa.String(80), nullable=False),
        sa.Column("avg_price", sa.String(80), nullable=False),
        sa.Column("strategy_id", sa.String(128), nullable=False),
        sa.Column("updated_at", sa.String(40), nullable=False),
    )
    op.create_table(
        "execution_outbox",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("account", sa.String(64), nullable=False),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("event_id", sa.String(128), nullable=False),
        sa.Column("client_order_id", sa.String(36), nullable=True),
        sa.Column("data", sa.Text, nullable=False),  # the TRADE_EVENT's JSON
        sa.Column("delivered", sa.Boolean, nullable=False),
        sa.Column("outcome", sa.Text, nullable=True),  # accepted (seq) or the refusal
        sa.Column("created_at", sa.String(40), nullable=False),
        sa.Column("delivered_at", sa.String(40), nullable=True),
        sa.UniqueConstraint("account", "source", "event_id", name="uq_execution_outbox_event"),
    )
    op.create_index("ix_execution_outbox_pending", "execution_outbox", ["account", "delivered"])


def downgrade() -> None:
    op.drop_index("ix_execution_outbox_pending", "execution_outbox")
    op.drop_table("execution_outbox")
    op.drop_table("execution_positions")
    op.drop_index("ix_execution_orders_intent", "execution_orders")
    op.drop_index("ix_execution_orders_status", "execution_orders")
    op.drop_table("execution_orders")
    op.drop_index("ix_execution_intents_status", "execution_intents")
    op.drop_table("execution_intents")
