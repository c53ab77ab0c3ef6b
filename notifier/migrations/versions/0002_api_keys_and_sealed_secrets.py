"""api keys, org enrichment gate, sealed secrets

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "api_keys",
        sa.Column(
            "id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False
        ),
        sa.Column("org_id", sa.BigInteger(), nullable=False),
        sa.Column("prefix", sa.String(length=16), nullable=False),
        sa.Column("key_hash", sa.String(length=64), nullable=False),
        sa.Column("created_at_ms", sa.BigInteger(), nullable=False),
        sa.Column("revoked_at_ms", sa.BigInteger(), nullable=True),
        sa.ForeignKeyConstraint(
            ["org_id"],
            ["orgs.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("key_hash"),
    )
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_api_keys_org_id"), ["org_id"], unique=False)

    with op.batch_alter_table("orgs", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column(
                "available_points_balance_enrichment_enabled",
                sa.Boolean(),
                server_default=sa.false(),
                nullable=False,
            )
        )

    with op.batch_alter_table("signing_secrets", schema=None) as batch_op:
        batch_op.alter_column(
            "secret", existing_type=sa.VARCHAR(length=100), type_=sa.Text(), existing_nullable=False
        )


    _seal_existing_secrets()


def _seal_existing_secrets() -> None:
    # Rows written by 0001 kept header values and signing secrets in the clear; seal them with
    # the keys this install runs with (NOTIFIER_SECRET_KEYS or the embedded default's key file).
    import json

    from config import load_settings
    from notifier.vault import vault_for

    settings = load_settings()
    vault = vault_for(settings.secret_keys, settings.data_dir)
    connection = op.get_bind()
    for row_id, secret in connection.execute(sa.text("SELECT id, secret FROM signing_secrets")).all():
        connection.execute(
            sa.text("UPDATE signing_secrets SET secret = :s WHERE id = :i"),
            {"s": vault.seal(secret), "i": row_id},
        )
    for row_id, headers in connection.execute(sa.text("SELECT id, headers FROM webhooks")).all():
        plain = json.loads(headers) if isinstance(headers, str) else headers
        sealed = json.dumps({name: vault.seal(value) for name, value in plain.items()})
        connection.execute(
            sa.text("UPDATE webhooks SET headers = :h WHERE id = :i"), {"h": sealed, "i": row_id}
        )


def downgrade() -> None:
    with op.batch_alter_table("signing_secrets", schema=None) as batch_op:
        batch_op.alter_column(
            "secret", existing_type=sa.Text(), type_=sa.VARCHAR(length=100), existing_nullable=False
        )

    with op.batch_alter_table("orgs", schema=None) as batch_op:
        batch_op.drop_column("available_points_balance_enrichment_enabled")

    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_api_keys_org_id"))

    op.drop_table("api_keys")
