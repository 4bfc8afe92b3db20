"""Alembic environment: the engine comes from the caller (``rotator db upgrade``, tests)."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Engine

import models

config = context.config
engine = config.attributes.get("engine")
if not isinstance(engine, Engine):
    from models.db import make_engine
    from rotator.settings import get_settings

    engine = make_engine(get_settings())

with engine.begin() as connection:
    context.configure(
        connection=connection,
        target_metadata=models.Base.metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    context.run_migrations()
