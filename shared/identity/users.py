"""Account rules, for AuthService and the command lines alike: usernames, e-mail
addresses, passwords (bcrypt cost), what a new account holds, that an account keeps its
kind and that an active admin remains. Also the first admin of a real database:
`python -m shared.identity.users create-admin`, and what both identity command lines
share (`cli_database`, `run_command`).

`make run` seeds the sample users (whose password is published) only into the
embedded database or with SEED=1, so a real database starts with no user at all.
This command makes an admin working straight on the database, like the tokens
command line:

    python -m shared.identity.users create-admin --username ada --email ada@example.com

The password is read from the terminal (asked twice) or, when stdin is not a
terminal, from its first line; never from an argument, which would stay in the
shell's history and in `ps`. The new user is audited like any other, with no
user id and `"via": "users-cli"` in the details.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import re
import sys
import uuid
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from typing import Any

import bcrypt
from sqlalchemy import func, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from shared.framework.config import db_statement_cache
from shared.framework.errors import AlreadyExists, DomainError, FailedPrecondition, InvalidArgument
from shared.framework.validation import text
from shared.identity.actor import Actor
from shared.persistence import audit_log
from shared.persistence.db import Database, database_url
from shared.persistence.models import Role, User

BCRYPT_COST = 12
PASSWORD_MAX_BYTES = 72  # bcrypt ignores (bcrypt 5 refuses) anything longer
UNUSABLE_PASSWORD = "!"  # no bcrypt hash matches it: the user cannot Login, only use tokens
USERNAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
USERNAME_HINT = "must start with a letter or digit and hold only letters, digits, . _ -"
EMAIL = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s]+")


def check_username(username: str) -> str:
    return text("username", username, 100, pattern=USERNAME, hint=USERNAME_HINT)


def check_email(email: str) -> str:
    return text("email", email, 255, pattern=EMAIL, hint="is not an e-mail address")


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


def new_user(
    user_id: uuid.UUID,
    username: str,
    email: str,
    full_name: str | None,
    hashed_password: str,
    role: Role,
) -> User:
    """An active account's row; `is_admin` follows the role (a constraint holds it too)."""
    return User(
        id=user_id,
        username=username,
        email=email,
        full_name=full_name,
        hashed_password=hashed_password,
        role=role.value,
        is_admin=role == Role.ADMIN,
        is_active=True,
    )


async def holder_of(session: AsyncSession, username: str, email: str) -> User | None:
    """The user who already has this username or this e-mail address, if any."""
    return await session.scalar(
        select(User).where(or_(User.username == username, User.email == email))
    )


async def add_user(
    session: AsyncSession, actor: Actor, user: User, details: dict | None = None
) -> None:
    """Stores a new account and its `create` audit row (`details` say how it was made)."""
    session.add(user)
    await session.flush()
    await audit_log.append(
        session,
        actor,
        "create",
        "user",
        user.id,
        {**(details or {}), "username": user.username, "role": user.role},
    )


def check_kind_kept(user: User, new_role: str) -> None:
    """FAILED_PRECONDITION (ACCOUNT_KIND_FIXED) for a role change to or from service: made a
    service user, a lead could be given a token by an admin, who would then act as her."""
    if (user.role == Role.SERVICE) != (new_role == Role.SERVICE):
        raise FailedPrecondition(
            f"{user.username} is a {'service' if user.role == Role.SERVICE else 'human'}"
            " account and stays one: create a service user (CreateUser, or the tokens"
            " command line) instead of changing a role to or from service",
            reason="ACCOUNT_KIND_FIXED",
            metadata={"user_id": str(user.id), "role": user.role, "requested_role": new_role},
        )


def apply_changes(user: User, changes: dict[str, object]) -> dict[str, list]:
    """Sets the fields whose value differs; returns them as {field: [old, new]}."""
    changed = {}
    for field, value in changes.items():
        old = getattr(user, field)
        if old != value:
            changed[field] = [old, value]
            setattr(user, field, value)
    if "role" in changed:
        user.is_admin = user.role == Role.ADMIN
    return changed


async def check_an_admin_remains(session: AsyncSession, user_id: uuid.UUID) -> None:
    """FAILED_PRECONDITION (LAST_ADMIN) when the changes flushed so far leave no active admin."""
    admins = await session.scalar(
        select(func.count()).select_from(User).where(User.is_admin, User.is_active)
    )
    if admins == 0:
        raise FailedPrecondition(
            "this change would leave no active admin",
            reason="LAST_ADMIN",
            metadata={"user_id": str(user_id)},
        )


async def create_admin(database: Database, username: str, email: str, password: str) -> User:
    """Stores a new active admin (audited); ALREADY_EXISTS when the name or e-mail is taken."""
    username = check_username(username)
    email = check_email(email)
    hashed = await asyncio.to_thread(
        bcrypt.hashpw, check_password("password", password), bcrypt.gensalt(BCRYPT_COST)
    )
    actor = Actor(None, None, None, None, "relman-users-cli")
    async with database.transaction() as session:
        clash = await holder_of(session, username, email)
        if clash is not None:
            raise AlreadyExists(f"a user named {clash.username} or with this e-mail exists")
        user = new_user(uuid.uuid4(), username, email, username, hashed.decode(), Role.ADMIN)
        details = {"via": "users-cli", "os_user": getpass.getuser()}
        await add_user(session, actor, user, details)
    return user


# -- command lines -------------------------------------------------------------------------


@asynccontextmanager
async def cli_database() -> AsyncIterator[Database]:
    """The services' database with one connection, made as the services make theirs
    (through PgBouncer too), for a command line; disposed after."""
    database = Database(database_url(), pool_size=1, statement_cache=db_statement_cache())
    try:
        yield database
    finally:
        await database.dispose()


def run_command(prog: str, command: Coroutine[Any, Any, str | None]) -> int:
    """Runs a command line's coroutine and prints what it returns on stdout; a refusal
    (DomainError) is `prog: message` on stderr and exit status 2."""
    try:
        output = asyncio.run(command)
    except DomainError as exc:
        print(f"{prog}: {exc.message}", file=sys.stderr)
        return 2
    if output is not None:
        print(output)
    return 0


def _read_password() -> str:
    if not sys.stdin.isatty():
        return sys.stdin.readline().rstrip("\r\n")
    first = getpass.getpass("password: ")
    if getpass.getpass("password again: ") != first:
        raise InvalidArgument.field("password", "the two passwords differ")
    return first


async def _create_admin_command(args) -> None:
    password = _read_password()
    async with cli_database() as database:
        user = await create_admin(database, args.username, args.email, password)
    print(f"created admin {user.username} ({user.id})", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shared.identity.users", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    create = commands.add_parser("create-admin", help="make an admin (password from stdin)")
    create.add_argument("--username", required=True)
    create.add_argument("--email", required=True)
    args = parser.parse_args(argv)
    return run_command("users", _create_admin_command(args))


if __name__ == "__main__":
    sys.exit(main())
