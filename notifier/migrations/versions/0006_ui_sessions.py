"""UI sessions bound to the API key they were signed in with (ui_sessions)

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "ui_sessions",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("org_id", sa.BigInteger(), sa.ForeignKey("orgs.id"), nullable=False),
        sa.Column("api_key_id", sa.BigInteger(), sa.ForeignKey("api_keys.id"), nullable=False),
        sa.Column("created_at_ms", sa.BigInteger(), nullable=False),
        sa.Column("last_seen_at_ms", sa.BigInteger(), nullable=False),
        sa.Column("ended_at_ms", sa.BigInteger(), nullable=True),
    )
    op.create_index("ix_ui_sessions_org_id", "ui_sessions", ["org_id"])
    op.create_index("ix_ui_sessions_api_key_id", "ui_sessions", ["api_key_id"])


def downgrade() -> None:
    op.drop_table("ui_sessions")
