"""Webhook secrets at rest (domain layer): encrypted with the key in WEBHOOK_SECRET_KEY_FILE,
so that whoever reads the database (a backup, a replica, the services' role) cannot sign
a message a receiver would trust. Fernet (AES-128-CBC with HMAC-SHA256, `cryptography`).

The key file is made at first start when missing (mode 0600, the first of several
replicas starting at once wins, whole), like the audit signing key; every replica of
deploy_svc needs the same file. Losing it makes every webhook's secret unreadable: its
deliveries then fail with `last_error` saying so until the webhook is made again.
"""

from __future__ import annotations

import logging
import secrets
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken

from shared.framework.key_files import write_new

log = logging.getLogger("relman.webhooks")


class SecretKeyError(RuntimeError):
    """The key file cannot be read or made, or a secret does not open with it."""


def new_secret() -> str:
    """A webhook's signing secret: 32 random bytes, URL-safe text (43 characters)."""
    return secrets.token_urlsafe(32)


class SecretBox:
    """Encrypts and decrypts webhook secrets with the key file's key."""

    def __init__(self, key: bytes) -> None:
        self._fernet = Fernet(key)

    def seal(self, secret: str) -> bytes:
        return self._fernet.encrypt(secret.encode())

    def open(self, sealed: bytes) -> str:
        try:
            return self._fernet.decrypt(sealed).decode()
        except InvalidToken:
            raise SecretKeyError(
                "the webhook's secret does not open with WEBHOOK_SECRET_KEY_FILE's key"
            ) from None


def load_box(path: Path) -> SecretBox:
    """The key file's SecretBox, the file made first when it is missing."""
    if not path.exists() and write_new(path, Fernet.generate_key() + b"\n"):
        log.warning(
            "made a webhook secret key at %s (WEBHOOK_SECRET_KEY_FILE): keep it, and give"
            " every deploy_svc replica the same file",
            path,
        )
    try:
        key = path.read_bytes().strip()
        return SecretBox(key)
    except OSError as error:
        raise SecretKeyError(f"WEBHOOK_SECRET_KEY_FILE {path}: {error.strerror}") from None
    except ValueError:
        raise SecretKeyError(
            f"WEBHOOK_SECRET_KEY_FILE {path}: not a Fernet key (32 url-safe base64 bytes)"
        ) from None
