"""reference data for enrichment; enriched payload and notes on deliveries

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "ref_awarded_references",
        sa.Column("org_id", sa.BigInteger(), nullable=False),
        sa.Column("loyalty_event_id", sa.String(length=100), nullable=False),
        sa.Column("program_id", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("block", sa.String(length=40), nullable=False),
        sa.Column("block_index", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("awarded_reference_id", sa.String(length=100), nullable=False),
        sa.ForeignKeyConstraint(
            ["org_id"],
            ["orgs.id"],
        ),
        sa.PrimaryKeyConstraint("org_id", "loyalty_event_id", "program_id", "block", "block_index"),
    )
    op.create_table(
        "ref_cards",
        sa.Column("org_id", sa.BigInteger(), nullable=False),
        sa.Column("card_number", sa.String(length=100), nullable=False),
        sa.Column("customer_id", sa.BigInteger(), nullable=False),
        sa.Column("source", sa.String(length=16), nullable=False),
        sa.Column("status", sa.String(length=32), nullable=True),
        sa.ForeignKeyConstraint(
            ["org_id"],
            ["orgs.id"],
        ),
        sa.PrimaryKeyConstraint("org_id", "card_number"),
    )
    with op.batch_alter_table("ref_cards", schema=None) as batch_op:
        batch_op.create_index("ix_ref_cards_customer", ["org_id", "customer_id"], unique=False)

    op.create_table(
        "ref_customer_identifiers",
        sa.Column("org_id", sa.BigInteger(), nullable=False),
        sa.Column("customer_id", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("source", sa.String(length=16), nullable=False),
        sa.Column(
            "identifiers",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=False,
        ),
        sa.ForeignKeyConstraint(
            ["org_id"],
            ["orgs.id"],
        ),
        sa.PrimaryKeyConstraint("org_id", "customer_id", "source"),
    )
    op.create_table(
        "ref_customers",
        sa.Column("org_id", sa.BigInteger(), nullable=False),
        sa.Column("id", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.ForeignKeyConstraint(
            ["org_id"],
            ["orgs.id"],
        ),
        sa.PrimaryKeyConstraint("org_id", "id"),
    )
    op.create_table(
        "ref_points_balances",
        sa.Column("org_id", sa.BigInteger(), nullable=False),
        sa.Column("customer_id", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("program_id", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("available_points", sa.Double(), nullable=False),
        sa.ForeignKeyConstraint(
            ["org_id"],
            ["orgs.id"],
        ),
        sa.PrimaryKeyConstraint("org_id", "customer_id", "program_id"),
    )
    op.create_table(
        "ref_stores",
        sa.Column("org_id", sa.BigInteger(), nullable=False),
        sa.Column("id", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("code", sa.String(length=200), nullable=True),
        sa.Column("name", sa.String(length=200), nullable=True),
        sa.Column("external_id", sa.String(length=200), nullable=True),
        sa.Column("external_id1", sa.String(length=200), nullable=True),
        sa.Column("external_id2", sa.String(length=200), nullable=True),
        sa.ForeignKeyConstraint(
            ["org_id"],
            ["orgs.id"],
        ),
        sa.PrimaryKeyConstraint("org_id", "id"),
    )
    op.create_table(
        "ref_tills",
        sa.Column("org_id", sa.BigInteger(), nullable=False),
        sa.Column("id", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("code", sa.String(length=200), nullable=True),
        sa.Column("name", sa.String(length=200), nullable=True),
        sa.Column("store_id", sa.BigInteger(), nullable=True),
        sa.ForeignKeyConstraint(
            ["org_id"],
            ["orgs.id"],
        ),
        sa.PrimaryKeyConstraint("org_id", "id"),
    )
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column(
                "enriched_payload",
                sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
                nullable=True,
            )
        )
        batch_op.add_column(sa.Column("enrichment_notes", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.drop_column("enrichment_notes")
        batch_op.drop_column("enriched_payload")

    op.drop_table("ref_tills")
    op.drop_table("ref_stores")
    op.drop_table("ref_points_balances")
    op.drop_table("ref_customers")
    op.drop_table("ref_customer_identifiers")
    with op.batch_alter_table("ref_cards", schema=None) as batch_op:
        batch_op.drop_index("ix_ref_cards_customer")

    op.drop_table("ref_cards")
    op.drop_table("ref_awarded_references")
