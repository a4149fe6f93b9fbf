"""Code both relman services use: configuration, database, models, auth, errors, server."""

from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
