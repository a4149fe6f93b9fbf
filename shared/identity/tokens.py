"""Token rules, and the tokens command line. The rules are steps that take the caller's
session (deploy_svc.accounts opens the unit of work): minting a secret, who may have a token
made, expiry, revocation. Verifying a token on a call is shared.identity.auth's.

A token someone made for another user is how a second person could act as a
human without their password: so tokens for others are for service users only,
an account never changes kind (UpdateUser refuses a role change to or from
service: ACCOUNT_KIND_FIXED), such a token stops working should its user's role
change anyway (revoked by UpdateUser; shared.identity.auth checks too), and every token
records who made it (`created_by`). API tokens expire (90 days by
default, at most a year); only a service user's may never expire, and only when
asked for.

`python -m shared.identity.tokens create --user NAME --name LABEL
[--expires-days N | --never-expires] [--service-user]` prints a new token for a
service user, working straight on the database, so an internal caller can have one
before any admin token exists. `list [--user NAME]` and `revoke ID` complete it.
Changes made here are audited like any other, with no user id and
`"via": "tokens-cli"` in the details; its tokens have no `created_by`.
"""

from __future__ import annotations

import argparse
import getpass
import secrets
import sys
import uuid
from datetime import UTC, datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from shared.framework.errors import InvalidArgument, NotFound, PermissionDenied
from shared.framework.validation import text
from shared.identity import users
from shared.identity.actor import Actor
from shared.identity.auth import token_hash
from shared.persistence import audit_log
from shared.persistence.db import Database, load
from shared.persistence.models import ApiToken, Role, User
from shared.persistence.pagination import Page, list_page

TOKEN_PREFIX = "rm_"
DEFAULT_LIFETIME = timedelta(days=90)
MAX_LIFETIME = timedelta(days=365)


def new_token() -> str:
    """A random opaque bearer token: 32 bytes from `secrets`, URL-safe."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


async def _store(
    session: AsyncSession,
    user: User,
    name: str,
    expires_at: datetime | None,
    created_by: uuid.UUID | None,
) -> tuple[str, ApiToken]:
    secret = new_token()
    token = ApiToken(
        user_id=user.id,
        token_hash=token_hash(secret),
        name=name,
        expires_at=expires_at,
        created_by=created_by,
    )
    session.add(token)
    await session.flush()
    await session.refresh(token)
    return secret, token


async def issue_token(
    session: AsyncSession, user: User, name: str, expires_at: datetime | None
) -> tuple[str, ApiToken]:
    """Stores a token of the user's own (a Login; the caller audits); returns the secret
    and its record."""
    return await _store(session, user, name, expires_at, created_by=user.id)


def token_expiry(user: User, expires_at: datetime | None, never_expires: bool) -> datetime | None:
    """When a new API token expires: as asked (within a year), else in 90 days; never only
    for a service user who asks for it, since a human's token outliving its purpose is a
    standing key to their account."""
    if never_expires:
        if expires_at is not None:
            raise InvalidArgument.field("never_expires", "cannot be combined with expires_at")
        if user.role != Role.SERVICE:
            raise InvalidArgument.field(
                "never_expires", f"only a service user's token may never expire ({user.role})"
            )
        return None
    now = datetime.now(UTC)
    if expires_at is None:
        return now + DEFAULT_LIFETIME
    if expires_at <= now:
        raise InvalidArgument.field("expires_at", "must be in the future")
    if expires_at > now + MAX_LIFETIME:
        raise InvalidArgument.field("expires_at", "must be at most one year ahead")
    return expires_at


async def create_token(
    session: AsyncSession,
    actor: Actor,
    user: User,
    name: str,
    expires_at: datetime | None,
    *,
    never_expires: bool = False,
) -> tuple[str, ApiToken]:
    """A new API token for `user`; returns the secret (shown once) and its record.

    Made for someone else, it may only be for a service user: a token for another human
    would let its maker act as them (approve their own deployment as a second lead)."""
    name = text("name", name, 100)
    if user.id != actor.user_id and user.role != Role.SERVICE:
        raise PermissionDenied(
            f"tokens for another user are for service users only; {user.username} logs in",
            reason="TOKEN_FOR_ANOTHER_USER",
            metadata={"user_id": str(user.id), "role": user.role},
        )
    if not user.is_active:
        raise InvalidArgument.field("user_id", f"user {user.username} is deactivated")
    expires_at = token_expiry(user, expires_at, never_expires)
    secret, token = await _store(session, user, name, expires_at, actor.user_id)
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


async def revoke_user_tokens(
    session: AsyncSession, user_id: uuid.UUID, *, made_by_others_only: bool = False
) -> int:
    """Revokes every live token of a user (on deactivation), or only those someone else
    made (on a change of role: such a token is valid only for a service user, and one for
    a person can only be a row from before the rules); returns how many."""
    query = update(ApiToken).where(ApiToken.user_id == user_id, ApiToken.revoked_at.is_(None))
    if made_by_others_only:
        query = query.where(ApiToken.created_by.is_distinct_from(user_id))
    result = await session.execute(query.values(revoked_at=datetime.now(UTC)))
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
            user = users.new_user(
                uuid.uuid4(),
                text("user", args.user, 100),
                f"{args.user}@services.relman.invalid",
                args.user,
                users.UNUSABLE_PASSWORD,
                Role.SERVICE,
            )
            await users.add_user(session, actor, user, details)
        if user is None:
            raise NotFound(f"no user {args.user!r} (add --service-user to create one)")
        expires = None if args.never_expires else datetime.now(UTC) + timedelta(args.expires_days)
        secret, token = await create_token(
            session, actor, user, args.name, expires, never_expires=args.never_expires
        )
    print(
        f"created token {token.id} for {user.username} ({user.role}); it is shown only once:",
        file=sys.stderr,
    )
    return secret


async def _list(database: Database, args) -> str:
    async with database.read() as session:
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
    async with users.cli_database() as database:
        return await args.command(database, args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m shared.identity.tokens", description="API tokens for internal callers."
    )
    commands = parser.add_subparsers(required=True)
    create = commands.add_parser("create", help="create a token and print it (once)")
    create.add_argument("--user", required=True, help="the service user the token acts as")
    create.add_argument("--name", required=True, help="a label, e.g. the caller's name")
    lifetime = create.add_mutually_exclusive_group()
    lifetime.add_argument(
        "--expires-days", type=int, default=90, help="lifetime in days (at most 365; default 90)"
    )
    lifetime.add_argument("--never-expires", action="store_true", help="a token without expiry")
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
    if not 1 <= getattr(args, "expires_days", 1) <= MAX_LIFETIME.days:
        parser.error(f"--expires-days must be from 1 to {MAX_LIFETIME.days}")
    return users.run_command("tokens", _run(args))


if __name__ == "__main__":
    sys.exit(main())
