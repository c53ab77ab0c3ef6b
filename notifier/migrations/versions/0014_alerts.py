"""operational alerts: an org names its operations webhook, and the alerts raised are kept
(the "Recent alerts" list; a unique key raises each once, one slaBreached per webhook a minute)

Revision ID: 0014
Revises: 0012
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0014"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("orgs") as batch:
        batch.add_column(sa.Column("operations_webhook_id", sa.String(24), nullable=True))
    op.create_table(
        "alerts",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True,
                  autoincrement=True),
        sa.Column("key", sa.String(100), nullable=False, unique=True),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("org_id", sa.BigInteger(), nullable=False),
        sa.Column("webhook_id", sa.String(24), nullable=False),
        sa.Column("count", sa.Integer(), nullable=False),
        sa.Column("data", sa.JSON().with_variant(JSONB(), "postgresql"), nullable=False),
        sa.Column("created_at_ms", sa.BigInteger(), nullable=False),
    )
    op.create_index("ix_alerts_org", "alerts", ["org_id", "id"])


def downgrade() -> None:
    op.drop_index("ix_alerts_org", table_name="alerts")
    op.drop_table("alerts")
    with op.batch_alter_table("orgs") as batch:
        batch.drop_column("operations_webhook_id")
