"""held deliveries: a deleted webhook (soft) is told from a deactivated one, which holds its
events as ``held`` deliveries (the status itself is only a new value of ``deliveries.status``)

Revision ID: 0010
Revises: 0009
"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("webhooks", sa.Column("deleted_at_ms", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("webhooks") as batch:
        batch.drop_column("deleted_at_ms")
