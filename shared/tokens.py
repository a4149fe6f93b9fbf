"""API tokens: created, listed and revoked by AuthService and by this command line.

`python -m shared.tokens create --user NAME --name LABEL [--expires-days N] [--service-user]`
prints a new token for an internal caller, working straight on the database, so
the first token can exist before any admin has one. `list [--user NAME]` and
`revoke ID` complete it. Changes made here are audited like any other, with no
user id and `"via": "tokens-cli"` in the details.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import sys
import uuid
from datetime import UTC, datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from shared import audit_log
from shared.actor import Actor
from shared.auth import new_token, token_hash
from shared.db import Database, database_url, load
from shared.errors import DomainError, InvalidArgument, NotFound
from shared.models import ApiToken, Role, User
from shared.pagination import Page, list_page
from shared.validation import text

UNUSABLE_PASSWORD = "!"  # no bcrypt hash matches it: the user cannot Login, only use tokens


async def issue_token(
    session: AsyncSession, user: User, name: str, expires_at: datetime | None
) -> tuple[str, ApiToken]:
    """Stores a new token for `user` (the caller audits); returns the secret and its record."""
    secret = new_token()
    token = ApiToken(
        id=uuid.uuid4(),
        user_id=user.id,
        token_hash=token_hash(secret),
        name=name,
        expires_at=expires_at,
    )
    session.add(token)
    await session.flush()
    await session.refresh(token)
    return secret, token


async def create_token(
    session: AsyncSession, actor: Actor, user: User, name: str, expires_at: datetime | None
) -> tuple[str, ApiToken]:
    """A new long-lived token for `user`; returns the secret (shown once) and its record."""
    name = text("name", name, 100)
    if expires_at is not None and expires_at <= datetime.now(UTC):
        raise InvalidArgument.field("expires_at", "must be in the future")
    if not user.is_active:
        raise InvalidArgument.field("user_id", f"user {user.username} is deactivated")
    secret, token = await issue_token(session, user, name, expires_at)
    await audit_log.append(
        session,
        actor,
        "create",
        "api_token",
        token.id,
        {
            "user_id": str(user.id),
            "name": name,
            "expires_at": expires_at.isoformat() if expires_at else None,
        },
    )
    return secret, token


async def list_tokens(
    session: AsyncSession, user_id: uuid.UUID | None, page_size: int, page_token: str
) -> Page:
    return await list_page(
        session, ApiToken, page_size=page_size, page_token=page_token, equal={"user_id": user_id}
    )


async def revoke_token(session: AsyncSession, actor: Actor, token_id: uuid.UUID) -> ApiToken:
    """Revokes a token (a second revocation changes nothing and is not an error)."""
    token = await load(session, ApiToken, token_id, for_update=True)
    if token.revoked_at is None:
        token.revoked_at = datetime.now(UTC)
        await audit_log.append(
            session,
            actor,
            "revoke",
            "api_token",
            token.id,
            {"user_id": str(token.user_id), "name": token.name},
        )
    return token


async def revoke_user_tokens(session: AsyncSession, user_id: uuid.UUID) -> int:
    """Revokes every live token of a user (on deactivation); returns how many."""
    result = await session.execute(
        update(ApiToken)
        .where(ApiToken.user_id == user_id, ApiToken.revoked_at.is_(None))
        .values(revoked_at=datetime.now(UTC))
    )
    return result.rowcount


# -- command line --------------------------------------------------------------------------


def _cli_actor() -> Actor:
    return Actor(None, None, None, None, "relman-tokens-cli")


async def _user_by_name(session: AsyncSession, username: str) -> User | None:
    return await session.scalar(select(User).where(User.username == username))


async def _create(database: Database, args) -> str:
    actor = _cli_actor()
    details = {"via": "tokens-cli", "os_user": getpass.getuser()}
    async with database.transaction() as session:
        user = await _user_by_name(session, args.user)
        if user is None and args.service_user:
            user = User(
                id=uuid.uuid4(),
                username=text("user", args.user, 100),
                email=f"{args.user}@services.relman.invalid",
                full_name=args.user,
                hashed_password=UNUSABLE_PASSWORD,
                role=Role.SERVICE.value,
                is_admin=False,
            )
            session.add(user)
            await session.flush()
            await audit_log.append(
                session,
                actor,
                "create",
                "user",
                user.id,
                {**details, "username": user.username, "role": "service"},
            )
        if user is None:
            raise NotFound(f"no user {args.user!r} (add --service-user to create one)")
        expires = (
            datetime.now(UTC) + timedelta(days=args.expires_days) if args.expires_days else None
        )
        secret, token = await create_token(session, actor, user, args.name, expires)
    print(
        f"created token {token.id} for {user.username} ({user.role}); it is shown only once:",
        file=sys.stderr,
    )
    return secret


async def _list(database: Database, args) -> str:
    async with database.transaction() as session:
        query = select(ApiToken, User.username).join(User, User.id == ApiToken.user_id)
        if args.user:
            query = query.where(User.username == args.user)
        rows = (await session.execute(query.order_by(ApiToken.created_at))).all()
    lines = ["id\tuser\tname\tcreated_at\texpires_at\tlast_used_at\trevoked_at"]
    for token, username in rows:
        lines.append(
            "\t".join(
                str(v or "-")
                for v in (
                    token.id,
                    username,
                    token.name,
                    token.created_at,
                    token.expires_at,
                    token.last_used_at,
                    token.revoked_at,
                )
            )
        )
    return "\n".join(lines)


async def _revoke(database: Database, args) -> str:
    try:
        token_id = uuid.UUID(args.id)
    except ValueError:
        raise InvalidArgument.field("id", "is not a UUID") from None
    async with database.transaction() as session:
        token = await revoke_token(session, _cli_actor(), token_id)
    return f"revoked token {token.id} ({token.name})"


async def _run(args) -> str:
    database = Database(database_url(), pool_size=1)
    try:
        return await args.command(database, args)
    finally:
        await database.dispose()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m shared.tokens", description="API tokens for internal callers."
    )
    commands = parser.add_subparsers(required=True)
    create = commands.add_parser("create", help="create a token and print it (once)")
    create.add_argument("--user", required=True, help="the user the token acts as")
    create.add_argument("--name", required=True, help="a label, e.g. the caller's name")
    create.add_argument("--expires-days", type=int, default=0, help="lifetime; 0: no expiry")
    create.add_argument(
        "--service-user",
        action="store_true",
        help="create USER with role service if it does not exist",
    )
    create.set_defaults(command=_create)
    listing = commands.add_parser("list", help="list tokens (never their secrets)")
    listing.add_argument("--user", help="only this user's tokens")
    listing.set_defaults(command=_list)
    revoke = commands.add_parser("revoke", help="revoke a token by id")
    revoke.add_argument("id")
    revoke.set_defaults(command=_revoke)
    args = parser.parse_args(argv)
    if getattr(args, "expires_days", 0) < 0:
        parser.error("--expires-days must not be negative")
    try:
        print(asyncio.run(_run(args)))
    except DomainError as exc:
        print(f"tokens: {exc.message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
