"""audit MAC keys per journal segment

Events name the journal segment whose derived key made their MAC; NULL for rows written
before (their MAC is an HMAC by the token's audit key itself). The head stays HMAC'd by
the audit key itself.

Revision ID: 4004ceeced2f
Revises: 7e336c77bad2
Create Date: 2026-12-04 05:09:04.171500
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '4004ceeced2f'
down_revision = '7e336c77bad2'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('audit_events', schema=None) as batch_op:
        batch_op.add_column(sa.Column('mac_key', sa.String(length=40), nullable=True))



def downgrade() -> None:
    with op.batch_alter_table('audit_events', schema=None) as batch_op:
        batch_op.drop_column('mac_key')

