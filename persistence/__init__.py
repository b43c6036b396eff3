"""Durable storage: models, engine/session factory, migrations."""
