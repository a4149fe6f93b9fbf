"""The first admin of a real database: `python -m shared.identity.users create-admin`.

`make run` seeds the sample users (whose password is published) only into the
embedded database or with SEED=1, so a real database starts with no user at all.
This command makes an admin working straight on the database, like the tokens
command line:

    python -m shared.identity.users create-admin --username ada --email ada@example.com

The password is read from the terminal (asked twice) or, when stdin is not a
terminal, from its first line; never from an argument, which would stay in the
shell's history and in `ps`. The new user is audited like any other, with no
user id and `"via": "users-cli"` in the details.

The rules of an account (username, e-mail, password, bcrypt cost) live here, for
this command and AuthService alike.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import re
import sys
import uuid

import bcrypt
from sqlalchemy import or_, select

from shared.framework.errors import AlreadyExists, DomainError, InvalidArgument
from shared.framework.validation import text
from shared.identity.actor import Actor
from shared.persistence import audit_log
from shared.persistence.db import Database, database_url
from shared.persistence.models import Role, User

BCRYPT_COST = 12
PASSWORD_MAX_BYTES = 72  # bcrypt ignores (bcrypt 5 refuses) anything longer
USERNAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
USERNAME_HINT = "must start with a letter or digit and hold only letters, digits, . _ -"
EMAIL = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s]+")


def check_password(field: str, password: str) -> bytes:
    """1 to 72 bytes of UTF-8 without NUL, as bcrypt needs."""
    if not password:
        raise InvalidArgument.field(field, "is required")
    if "\x00" in password:
        raise InvalidArgument.field(field, "must not contain NUL characters")
    encoded = password.encode()
    if len(encoded) > PASSWORD_MAX_BYTES:
        raise InvalidArgument.field(field, f"is longer than {PASSWORD_MAX_BYTES} bytes")
    return encoded


def _read_password() -> str:
    if not sys.stdin.isatty():
        return sys.stdin.readline().rstrip("\r\n")
    first = getpass.getpass("password: ")
    if getpass.getpass("password again: ") != first:
        raise InvalidArgument.field("password", "the two passwords differ")
    return first


async def create_admin(database: Database, username: str, email: str, password: str) -> User:
    """Stores a new active admin (audited); ALREADY_EXISTS when the name or e-mail is taken."""
    username = text("username", username, 100, pattern=USERNAME, hint=USERNAME_HINT)
    email = text("email", email, 255, pattern=EMAIL, hint="is not an e-mail address")
    hashed = await asyncio.to_thread(
        bcrypt.hashpw, check_password("password", password), bcrypt.gensalt(BCRYPT_COST)
    )
    actor = Actor(None, None, None, None, "relman-users-cli")
    async with database.transaction() as session:
        clash = await session.scalar(
            select(User).where(or_(User.username == username, User.email == email))
        )
        if clash is not None:
            raise AlreadyExists(f"a user named {clash.username} or with this e-mail exists")
        user = User(
            id=uuid.uuid4(),
            username=username,
            email=email,
            full_name=username,
            hashed_password=hashed.decode(),
            role=Role.ADMIN.value,
            is_admin=True,
            is_active=True,
        )
        session.add(user)
        await session.flush()
        details = {"via": "users-cli", "os_user": getpass.getuser(), "role": "admin"}
        await audit_log.append(
            session, actor, "create", "user", user.id, {**details, "username": username}
        )
    return user


async def _main(args) -> None:
    password = _read_password()
    database = Database(database_url(), pool_size=1)
    try:
        user = await create_admin(database, args.username, args.email, password)
    finally:
        await database.dispose()
    print(f"created admin {user.username} ({user.id})", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shared.identity.users", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    create = commands.add_parser("create-admin", help="make an admin (password from stdin)")
    create.add_argument("--username", required=True)
    create.add_argument("--email", required=True)
    args = parser.parse_args(argv)
    try:
        asyncio.run(_main(args))
    except DomainError as exc:
        print(f"users: {exc.message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
