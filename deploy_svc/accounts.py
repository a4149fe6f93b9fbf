"""AuthService's use cases: login, logout, WhoAmI, user administration and API tokens.
Each takes the Database and opens its own unit(s) of work; the rules it applies are
shared.identity.users' (accounts) and shared.identity.tokens' (tokens), and failed logins
are counted by deploy_svc.login_throttle. GetUser and ListUsers are open to every
signed-in user and decided here: an admin reads everyone, anyone else only themselves.

Login never says which part was wrong: an unknown user, and a user without a
password (a service user), are checked against a dummy hash, and unknown user,
wrong password and deactivated user all get the same UNAUTHENTICATED answer, in
about the same time. bcrypt (cost 12) runs in a worker thread and never while a
database connection is held; failed logins are throttled (deploy_svc.login_throttle)
and at most `queue_max` password checks wait for that thread, so that a flood is
refused at once instead of queueing without bound. A login takes its peer's turn
before a place in that queue, so one address holds at most one place.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import bcrypt
from sqlalchemy import select

from deploy_svc import login_throttle
from deploy_svc.login_throttle import LoginLimits
from shared.framework.errors import AlreadyExists, InvalidArgument, Unauthenticated
from shared.framework.validation import text
from shared.identity import tokens, users
from shared.identity.actor import Actor
from shared.identity.auth import may, require
from shared.identity.users import BCRYPT_COST, check_password
from shared.persistence import audit_log
from shared.persistence.db import Database, load
from shared.persistence.idempotency import RequestKey, remember, replay
from shared.persistence.models import ApiToken, Role, User
from shared.persistence.pagination import Page, list_page

# A cost-12 hash of a random password nobody knows: unknown users are checked against it.
DUMMY_HASH = b"$2b$12$R9D7xE0wAKfUvLP49tMyr..qZBn9Aoe8.CFFanuVaanNLKLPmxXp6"


def _password_matches(password: bytes, stored: bytes) -> bool:
    try:
        return bcrypt.checkpw(password, stored)
    except ValueError:  # a malformed hash
        return False


def _lower_priority() -> None:
    """Runs in the hashing thread: SCHED_IDLE (any other thread that wants the core gets it
    at once), else the lowest nice value; on Linux both are per thread."""
    thread = threading.get_native_id()
    try:
        os.sched_setscheduler(thread, os.SCHED_IDLE, os.sched_param(0))
    except (OSError, AttributeError):
        with contextlib.suppress(OSError, AttributeError):
            os.setpriority(os.PRIO_PROCESS, thread, 19)


# bcrypt takes a quarter of a second of CPU per check. One thread at the lowest
# priority does all of it, so that a burst of logins queues here instead of taking the
# cores from the event loops and the database (make bench: LogAction beside Logins).
HASHING_THREADS = 1
_hashing = ThreadPoolExecutor(HASHING_THREADS, "bcrypt", initializer=_lower_priority)


async def _hashing_thread(function, *args):
    return await asyncio.get_running_loop().run_in_executor(_hashing, function, *args)


async def hash_password(password: bytes) -> str:
    hashed = await _hashing_thread(bcrypt.hashpw, password, bcrypt.gensalt(BCRYPT_COST))
    return hashed.decode()


_logins_checking = 0  # logins of this process between admission and their password check's end


@contextlib.contextmanager
def _password_check_slot(queue_max: int):
    """One of `queue_max` places for a login's password check, or RESOURCE_EXHAUSTED at once:
    a flood gets refused in microseconds instead of waiting minutes for the one thread."""
    global _logins_checking
    if _logins_checking >= queue_max:
        raise login_throttle.busy()
    _logins_checking += 1
    try:
        yield
    finally:
        _logins_checking -= 1


async def login(
    database: Database,
    actor: Actor,
    username: str,
    password: str,
    ttl_s: int,
    limits: LoginLimits,
    peers: login_throttle.PeerQueue,
) -> tuple[str, ApiToken, User]:
    """A new login token for valid credentials; every refusal looks the same and is audited
    (a throttled one once per window). The peer's turn comes before the queue's place: the
    other way round, one address's logins waiting for their turn held every place.

    Two units of work (one when throttled): bcrypt runs between them holding no connection,
    and a refusal's count and audit row must commit although the call fails."""
    username = text("username", username, 100)
    secret_bytes = check_password("password", password)
    async with peers.one_at_a_time(actor):
        with _password_check_slot(limits.queue_max):
            async with database.transaction() as session:
                refusal = await login_throttle.refusal(session, actor, username, limits)
                by_name = select(User).where(User.username == username)
                user = None if refusal else await session.scalar(by_name)
            if refusal is not None:
                raise refusal
            usable = user is not None and user.hashed_password.startswith("$2")
            stored = user.hashed_password.encode() if usable else DUMMY_HASH
            matches = await _hashing_thread(_password_matches, secret_bytes, stored) and usable
            if not matches or not user.is_active:
                async with database.transaction() as session:
                    await login_throttle.failed(session, actor, username, limits)
                    await audit_log.append(
                        session,
                        actor,
                        "login_failed",
                        "user",
                        user.id if user else None,
                        {"username": username},
                    )
                raise Unauthenticated("invalid username or password", reason="INVALID_CREDENTIALS")
    async with database.transaction() as session:
        await login_throttle.succeeded(session, actor, username, limits)
        expires_at = datetime.now(UTC) + timedelta(seconds=ttl_s)
        secret, token = await tokens.issue_token(session, user, "login", expires_at)
        signed_in = actor.signed_in(user.id, user.username, Role(user.role), token.id)
        await audit_log.append(
            session, signed_in, "login", "user", user.id, {"token_id": str(token.id)}
        )
    return secret, token, user


async def logout(database: Database, actor: Actor) -> None:
    """Revokes the token the call was made with."""
    async with database.transaction() as session:
        token = await session.get(ApiToken, actor.token_id, with_for_update=True)
        token.revoked_at = datetime.now(UTC)
        await audit_log.append(
            session, actor, "logout", "user", actor.user_id, {"token_id": str(actor.token_id)}
        )


async def get_user(database: Database, user_id: uuid.UUID) -> User:
    """A user's row (WhoAmI: the caller's own)."""
    async with database.read() as session:
        return await load(session, User, user_id)


async def read_user(database: Database, actor: Actor, user_id: uuid.UUID) -> User:
    """GetUser: an admin reads any user, anyone else only themselves. Another user's id is
    PERMISSION_DENIED whether or not that user exists, so the answer tells nobody who does."""
    if user_id != actor.user_id:
        require(actor, "users.admin")
    async with database.replica_read() as session:
        return await load(session, User, user_id)


async def list_users(database: Database, actor: Actor, page_size: int, page_token: str) -> Page:
    """ListUsers: every user for an admin; anyone else gets a page holding only themselves.
    That restriction is a filter like any other, so a page token made for one never serves
    the other."""
    only = None if may(actor, "users.admin") else actor.user_id
    async with database.replica_read() as session:
        return await list_page(
            session, User, page_size=page_size, page_token=page_token, equal={"id": only}
        )


async def create_user(
    database: Database,
    actor: Actor,
    *,
    username: str,
    email: str,
    full_name: str,
    password: str,
    role: Role | None,
    key: RequestKey | None,
) -> User:
    """A new user. Service users may have no password: they use API tokens only. bcrypt
    runs before the unit of work, holding no connection."""
    username = users.check_username(username)
    email = users.check_email(email)
    full_name = text("full_name", full_name, 200, required=False)
    if role is None:
        raise InvalidArgument.field("role", "is required")
    if password or role != Role.SERVICE:
        hashed = await hash_password(check_password("password", password))
    else:
        hashed = users.UNUSABLE_PASSWORD
    async with database.transaction() as session:
        if earlier := await replay(session, key, User):
            return earlier
        clash = await users.holder_of(session, username, email)
        if clash is not None:
            field = "username" if clash.username == username else "email"
            raise AlreadyExists(
                f"a user with this {field} exists",
                reason="USER_EXISTS",
                metadata={"user_id": str(clash.id), "field": field},
            )
        user = users.new_user(uuid.uuid4(), username, email, full_name, hashed, role)
        await users.add_user(session, actor, user)
        await remember(session, key, "user", user.id)
        await session.refresh(user)
    return user


async def update_user(
    database: Database, actor: Actor, user_id: uuid.UUID, changes: dict[str, object]
) -> tuple[User, bool]:
    """Applies `changes` (of role, is_active, full_name); returns the user and whether tokens
    were revoked: all of them on deactivation, those others made for the user on a change
    of role (a second line behind ACCOUNT_KIND_FIXED). Refused: a change of account kind,
    and one that leaves no active admin (shared.identity.users)."""
    async with database.transaction() as session:
        user = await load(session, User, user_id, for_update=True)
        users.check_kind_kept(user, changes.get("role", user.role))
        changed = users.apply_changes(user, changes)
        revoked = 0
        if changed.get("is_active", [None, True])[1] is False:
            revoked = await tokens.revoke_user_tokens(session, user.id)
        elif "role" in changed:
            revoked = await tokens.revoke_user_tokens(session, user.id, made_by_others_only=True)
        await session.flush()
        await users.check_an_admin_remains(session, user_id)
        if changed:
            await audit_log.append(
                session,
                actor,
                "update",
                "user",
                user.id,
                {"changed": changed, "tokens_revoked": revoked},
            )
        await session.refresh(user)
    return user, revoked > 0


async def create_api_token(
    database: Database,
    actor: Actor,
    user_id: uuid.UUID,
    name: str,
    expires_at: datetime | None,
    *,
    never_expires: bool,
    key: RequestKey | None,
) -> tuple[str, ApiToken]:
    """An API token (shared.identity.tokens has the rules); the user's row stays locked until
    it is stored, so a concurrent change of role cannot slip between the check and the insert.
    A retry gets the record with an empty secret: secrets are never stored."""
    async with database.transaction() as session:
        # Locked before the request id's claim, whose foreign key holds the caller's row
        # KEY SHARE: a caller minting two tokens for itself at once would deadlock.
        user = await load(session, User, user_id, for_update=True)
        if earlier := await replay(session, key, ApiToken):
            return "", earlier
        secret, token = await tokens.create_token(
            session, actor, user, name, expires_at, never_expires=never_expires
        )
        await remember(session, key, "api_token", token.id)
        return secret, token


async def list_api_tokens(
    database: Database, user_id: uuid.UUID | None, page_size: int, page_token: str
) -> Page:
    """One page of API token records (never their secrets), of one user or of all."""
    async with database.read() as session:
        return await tokens.list_tokens(session, user_id, page_size, page_token)


async def revoke_api_token(database: Database, actor: Actor, token_id: uuid.UUID) -> ApiToken:
    """Revokes a token (audited); revoking it again changes nothing and is not an error."""
    async with database.transaction() as session:
        return await tokens.revoke_token(session, actor, token_id)
