"""several bridges on one database: every row keyed by its bridge (VEN), station claims, shared limits

Revision ID: 0004_bridges
Revises: 0003_reporting
Create Date: 2026-12-01 22:50:00
"""
import warnings

from alembic import op
import sqlalchemy as sa
import sqlmodel
import dr_bridge.store


revision = '0004_bridges'
down_revision = '0003_reporting'
branch_labels = None
depends_on = None

# Rows written before this revision get bridge '' and are adopted by the first named bridge (Store.open).
KEYED = {'events': ['bridge', 'event_id'], 'session_state': ['bridge', 'session_id'], 'webhooks': ['bridge', 'id']}
INDEXED = ['intervals', 'actions', 'opt_outs', 'performance', 'readings']


def _bridge_column() -> sa.Column:
    return sa.Column('bridge', sqlmodel.sql.sqltypes.AutoString(), nullable=False, server_default='')


def upgrade() -> None:
    with warnings.catch_warnings():
        # SQLite's batch copy reflects the old one-column key before it is replaced, and says so.
        warnings.filterwarnings('ignore', message='.*specifies columns .* as primary_key=True')
        _upgrade(op.get_bind().dialect.name == 'postgresql')


def _upgrade(postgres: bool) -> None:
    for table, key in KEYED.items():
        with op.batch_alter_table(table, recreate='always' if not postgres else 'auto') as b:
            b.add_column(_bridge_column())
            if postgres:
                b.drop_constraint(f'{table}_pkey', type_='primary')
            b.create_primary_key(f'{table}_pkey', key)
    for table in INDEXED:
        with op.batch_alter_table(table) as b:
            b.add_column(_bridge_column())
            b.create_index(f'ix_{table}_bridge', ['bridge'])
    # ven_state: one row per bridge instead of the single row id=1.
    with op.batch_alter_table('ven_state', recreate='always' if not postgres else 'auto') as b:
        b.add_column(_bridge_column())
        if postgres:
            b.drop_constraint('ven_state_pkey', type_='primary')
        b.drop_column('id')
        b.create_primary_key('ven_state_pkey', ['bridge'])

    op.create_table('station_claims',
    sa.Column('chargestation_id', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('bridge', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('resource_id', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('shared', sa.Boolean(), nullable=False),
    sa.Column('claimed_at', dr_bridge.store.UTCDateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('chargestation_id', 'bridge')
    )
    op.create_table('shared_limits',
    sa.Column('bridge', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('chargestation_id', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('watts', sa.Float(), nullable=False),
    sa.Column('event_id', sqlmodel.sql.sqltypes.AutoString(), nullable=True),
    sa.Column('until', dr_bridge.store.UTCDateTime(timezone=True), nullable=False),
    sa.Column('updated_at', dr_bridge.store.UTCDateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('bridge', 'chargestation_id')
    )


def downgrade() -> None:
    raise NotImplementedError("several bridges' rows cannot be folded back into one")
