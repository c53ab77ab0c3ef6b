"""deliveries keep what enrichment added, not the whole enriched payload

The payload a webhook received is its event's payload overlaid with what enrichment added
(``notifier.enrich.overlay``). Keeping only the additions writes less per delivery (with every
option on, 1.2 KiB of jsonb instead of 1.5 KiB) and never a second copy of the event. Rows
written before hold the whole enriched payload, which overlays to itself.

Revision ID: 0004
Revises: 0003
"""

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("deliveries") as batch_op:
        batch_op.alter_column("enriched_payload", new_column_name="enrichment")


def downgrade() -> None:
    with op.batch_alter_table("deliveries") as batch_op:
        batch_op.alter_column("enrichment", new_column_name="enriched_payload")
