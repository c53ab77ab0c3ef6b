"""claim tokens: each claim of deliveries is named, so that a rebuilt Redis counts one slot per
claim (two claims made in one millisecond share their expiry)

Revision ID: 0008
Revises: 0007
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("deliveries", sa.Column("claimed_by", sa.String(32), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("deliveries") as batch:
        batch.drop_column("claimed_by")
