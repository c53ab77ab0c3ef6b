"""dead letters: events that could not be stored, kept with the reason and replayable

Revision ID: 0007
Revises: 0006
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "dead_letters",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True,
                  autoincrement=True),
        sa.Column("envelope", sa.Text(), nullable=False),
        sa.Column("event_id", sa.String(100), nullable=True),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("received_at_ms", sa.BigInteger(), nullable=False),
        sa.Column("replayed_at_ms", sa.BigInteger(), nullable=True),
    )
    op.create_index("ix_dead_letters_replayed_at_ms", "dead_letters", ["replayed_at_ms"])


def downgrade() -> None:
    op.drop_index("ix_dead_letters_replayed_at_ms", table_name="dead_letters")
    op.drop_table("dead_letters")
