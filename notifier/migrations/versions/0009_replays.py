"""replays: each replay by selection is recorded (when, who, the selection, how many it queued),
and the deliveries it queued point at it, so its progress can be read

Revision ID: 0009
Revises: 0008
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "replays",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True,
                  autoincrement=True),
        sa.Column("created_at_ms", sa.BigInteger(), nullable=False),
        sa.Column("requested_by", sa.String(200), nullable=False),
        sa.Column("org_id", sa.BigInteger(), nullable=True),
        sa.Column("selection", sa.JSON().with_variant(JSONB(), "postgresql"), nullable=False),
        sa.Column("queued", sa.Integer(), nullable=False, server_default="0"),
    )
    op.create_index("ix_replays_org_id", "replays", ["org_id"])
    with op.batch_alter_table("deliveries") as batch:
        batch.add_column(sa.Column("replay_id", sa.BigInteger(), nullable=True))
        batch.create_index("ix_deliveries_replay", ["replay_id"])


def downgrade() -> None:
    with op.batch_alter_table("deliveries") as batch:
        batch.drop_index("ix_deliveries_replay")
        batch.drop_column("replay_id")
    op.drop_index("ix_replays_org_id", "replays")
    op.drop_table("replays")
