"""webhooks and readings

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25 10:28:42.849821
"""
from alembic import op
import sqlalchemy as sa
import sqlmodel
import dr_bridge.store


revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('readings',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('at', dr_bridge.store.UTCDateTime(timezone=True), nullable=False),
    sa.Column('session_id', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('chargestation_id', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('power_kw', sa.Float(), nullable=True),
    sa.Column('current_a', sa.Float(), nullable=True),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('readings', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_readings_at'), ['at'], unique=False)
        batch_op.create_index(batch_op.f('ix_readings_chargestation_id'), ['chargestation_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_readings_session_id'), ['session_id'], unique=False)

    op.create_table('webhooks',
    sa.Column('id', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('type', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('received_at', dr_bridge.store.UTCDateTime(timezone=True), nullable=False),
    sa.Column('created_at', dr_bridge.store.UTCDateTime(timezone=True), nullable=True),
    sa.Column('body', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('processed', sa.Boolean(), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )


def downgrade() -> None:
    op.drop_table('webhooks')
    with op.batch_alter_table('readings', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_readings_session_id'))
        batch_op.drop_index(batch_op.f('ix_readings_chargestation_id'))
        batch_op.drop_index(batch_op.f('ix_readings_at'))

    op.drop_table('readings')
