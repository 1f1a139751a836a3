"""initial schema

Revision ID: 0001
Revises: 
Create Date: 2026-11-25 10:21:57.220603
"""
from alembic import op
import sqlalchemy as sa
import sqlmodel
import dr_bridge.store


revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('actions',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('event_id', sqlmodel.sql.sqltypes.AutoString(), nullable=True),
    sa.Column('at', dr_bridge.store.UTCDateTime(timezone=True), nullable=False),
    sa.Column('updated_at', dr_bridge.store.UTCDateTime(timezone=True), nullable=False),
    sa.Column('session_id', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('chargestation_id', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('resource_id', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('kind', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('purpose', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('unit', sqlmodel.sql.sqltypes.AutoString(), nullable=True),
    sa.Column('limit', sa.Float(), nullable=True),
    sa.Column('status', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('detail', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('edrv_action_id', sqlmodel.sql.sqltypes.AutoString(), nullable=True),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('actions', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_actions_edrv_action_id'), ['edrv_action_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_actions_event_id'), ['event_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_actions_session_id'), ['session_id'], unique=False)

    op.create_table('events',
    sa.Column('event_id', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('ven_id', sqlmodel.sql.sqltypes.AutoString(), nullable=True),
    sa.Column('modification_number', sa.Integer(), nullable=False),
    sa.Column('status', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('opt', sqlmodel.sql.sqltypes.AutoString(), nullable=True),
    sa.Column('opt_reason', sqlmodel.sql.sqltypes.AutoString(), nullable=True),
    sa.Column('start', dr_bridge.store.UTCDateTime(timezone=True), nullable=False),
    sa.Column('end', dr_bridge.store.UTCDateTime(timezone=True), nullable=True),
    sa.Column('effective_start', dr_bridge.store.UTCDateTime(timezone=True), nullable=False),
    sa.Column('offset_s', sa.Float(), nullable=False),
    sa.Column('test_event', sa.Boolean(), nullable=False),
    sa.Column('dry_run', sa.Boolean(), nullable=False),
    sa.Column('event_json', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('received_at', dr_bridge.store.UTCDateTime(timezone=True), nullable=False),
    sa.Column('updated_at', dr_bridge.store.UTCDateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('event_id')
    )
    op.create_table('intervals',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('event_id', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('start', dr_bridge.store.UTCDateTime(timezone=True), nullable=False),
    sa.Column('end', dr_bridge.store.UTCDateTime(timezone=True), nullable=True),
    sa.Column('signal_name', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('signal_type', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('value', sa.Float(), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('intervals', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_intervals_event_id'), ['event_id'], unique=False)

    op.create_table('opt_outs',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('at', dr_bridge.store.UTCDateTime(timezone=True), nullable=False),
    sa.Column('event_id', sqlmodel.sql.sqltypes.AutoString(), nullable=True),
    sa.Column('modification_number', sa.Integer(), nullable=True),
    sa.Column('resource_id', sqlmodel.sql.sqltypes.AutoString(), nullable=True),
    sa.Column('window_start', dr_bridge.store.UTCDateTime(timezone=True), nullable=True),
    sa.Column('window_end', dr_bridge.store.UTCDateTime(timezone=True), nullable=True),
    sa.Column('reason', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('source', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('applied', sa.Boolean(), nullable=False),
    sa.Column('sent', sa.Boolean(), nullable=False),
    sa.Column('acknowledged', sa.Boolean(), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('opt_outs', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_opt_outs_event_id'), ['event_id'], unique=False)

    op.create_table('session_state',
    sa.Column('session_id', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('chargestation_id', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('resource_id', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('event_id', sqlmodel.sql.sqltypes.AutoString(), nullable=True),
    sa.Column('limited', sa.Boolean(), nullable=False),
    sa.Column('unit', sqlmodel.sql.sqltypes.AutoString(), nullable=True),
    sa.Column('limit', sa.Float(), nullable=True),
    sa.Column('ended', sa.Boolean(), nullable=False),
    sa.Column('updated_at', dr_bridge.store.UTCDateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('session_id')
    )
    with op.batch_alter_table('session_state', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_session_state_chargestation_id'), ['chargestation_id'], unique=False)

    op.create_table('ven_state',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('ven_id', sqlmodel.sql.sqltypes.AutoString(), nullable=True),
    sa.Column('registration_id', sqlmodel.sql.sqltypes.AutoString(), nullable=True),
    sa.Column('vtn_url', sqlmodel.sql.sqltypes.AutoString(), nullable=True),
    sa.Column('updated_at', dr_bridge.store.UTCDateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )


def downgrade() -> None:
    op.drop_table('ven_state')
    with op.batch_alter_table('session_state', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_session_state_chargestation_id'))

    op.drop_table('session_state')
    with op.batch_alter_table('opt_outs', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_opt_outs_event_id'))

    op.drop_table('opt_outs')
    with op.batch_alter_table('intervals', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_intervals_event_id'))

    op.drop_table('intervals')
    op.drop_table('events')
    with op.batch_alter_table('actions', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_actions_session_id'))
        batch_op.drop_index(batch_op.f('ix_actions_event_id'))
        batch_op.drop_index(batch_op.f('ix_actions_edrv_action_id'))

    op.drop_table('actions')
