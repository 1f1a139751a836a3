"""opt reasons and measured performance

Revision ID: 0003_reporting
Revises: 0002
Create Date: 2026-11-25 11:10:15.958205
"""
from alembic import op
import sqlalchemy as sa
import sqlmodel
import dr_bridge.store


revision = '0003_reporting'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('performance',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('event_id', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('modification_number', sa.Integer(), nullable=False),
    sa.Column('resource_id', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('signal_name', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('signal_type', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('interval_start', dr_bridge.store.UTCDateTime(timezone=True), nullable=False),
    sa.Column('window_start', dr_bridge.store.UTCDateTime(timezone=True), nullable=False),
    sa.Column('window_end', dr_bridge.store.UTCDateTime(timezone=True), nullable=False),
    sa.Column('baseline_start', dr_bridge.store.UTCDateTime(timezone=True), nullable=True),
    sa.Column('baseline_end', dr_bridge.store.UTCDateTime(timezone=True), nullable=True),
    sa.Column('baseline_kw', sa.Float(), nullable=True),
    sa.Column('mean_kw', sa.Float(), nullable=True),
    sa.Column('reduction_kw', sa.Float(), nullable=True),
    sa.Column('reduction_pct', sa.Float(), nullable=True),
    sa.Column('requested_kw', sa.Float(), nullable=True),
    sa.Column('computed_at', dr_bridge.store.UTCDateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('performance', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_performance_event_id'), ['event_id'], unique=False)

    with op.batch_alter_table('opt_outs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('opt_reason', sqlmodel.sql.sqltypes.AutoString(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('opt_outs', schema=None) as batch_op:
        batch_op.drop_column('opt_reason')

    with op.batch_alter_table('performance', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_performance_event_id'))

    op.drop_table('performance')
