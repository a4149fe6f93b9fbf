"""Sealed audit trail: every row sealed, every seal signed and chained, and tampering by
someone holding the database's superuser found through VerifyAuditLog and offline
(python -m audit_svc.verify), each with its kind and where.

Each test has a database and an audit_svc of its own (`trail`): tampering is for ever.
Tampering runs as the server's superuser with triggers off for the act
(session_replication_role = replica), as an administrator would do it.
"""

from __future__ import annotations

import asyncio
import base64
import uuid
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import grpc
import pytest
from google.protobuf import json_format
from google.protobuf.timestamp_pb2 import Timestamp

from audit_svc import verify as offline
from relman.v1 import audit_pb2, audit_pb2_grpc
from shared.identity.tokens import issue_token
from shared.persistence.db import Database, libpq_dsn
from shared.persistence.models import User
from tests.harness import (
    RelmanProcess,
    bearer,
    client_address,
    poll,
    scratch_database,
    start_service,
)

Kind = audit_pb2.AuditIntegrityProblem.Kind
ROWS = 60


@dataclass
class Trail:
    url: object
    db: asyncpg.Connection  # the server's superuser, on this database
    stub: audit_pb2_grpc.AuditServiceStub
    metadata: tuple
    process: RelmanProcess
    tmp: Path

    async def log(self, count: int, tag: str = "seal.test") -> None:
        async def batches():
            yield audit_pb2.LogActionsRequest(
                actions=[
                    audit_pb2.LogActionRequest(
                        action=tag, resource_type="release", resource_id=f"r{i}"
                    )
                    for i in range(count)
                ]
            )

        await self.stub.LogActions(batches(), metadata=self.metadata)

    async def all_sealed(self) -> int:
        """Waits until every row written so far is sealed; returns the last sequence."""
        last = await self.db.fetchval("SELECT max(sequence) FROM audit_logs")

        async def sealed():
            return await self.db.fetchval(
                "SELECT coalesce(max(last_sequence), 0) >= $1 FROM audit_seals", last
            )

        await poll(sealed, 30, "every row sealed")
        return last

    async def tamper(self, *statements: str, args=()) -> None:
        """As the superuser, triggers off: what a database administrator can do."""
        async with self.db.transaction():
            await self.db.execute("SET LOCAL session_replication_role = replica")
            for statement in statements:
                await self.db.execute(statement, *args)

    async def verify(self, **fields) -> audit_pb2.VerifyAuditLogResponse:
        return await self.stub.VerifyAuditLog(
            audit_pb2.VerifyAuditLogRequest(**fields), metadata=self.metadata
        )

    async def offline(self, checkpoint: str | None = None) -> tuple[int, list[str]]:
        """Fetches the seals, the keys and a raw export of the seals' range through the API
        and runs the offline verifier on them: (exit status, what it printed)."""
        seals = (
            await self.stub.ListAuditSeals(
                audit_pb2.ListAuditSealsRequest(page_size=1000), metadata=self.metadata
            )
        ).seals
        seals_file = self.tmp / "seals.jsonl"
        seals_file.write_text(
            "".join(
                json_format.MessageToJson(seal, indent=None) + "\n" for seal in seals
            )
        )
        keys = await self.stub.ListAuditSigningKeys(
            audit_pb2.ListAuditSigningKeysRequest(), metadata=self.metadata
        )
        keys_file = self.tmp / "keys.pem"
        keys_file.write_text("".join(key.public_key_pem for key in keys.keys))
        request = audit_pb2.ExportAuditLogsRequest(
            filter=audit_pb2.AuditLogFilter(
                start_sequence=seals[0].first_sequence, end_sequence=seals[-1].last_sequence
            ),
            raw=True,
        )
        export_file = self.tmp / "export.csv"
        export_file.write_text(
            "".join([c.data async for c in self.stub.ExportAuditLogs(request, metadata=self.metadata)])
        )
        outcome = offline.verify_files(export_file, seals_file, [keys_file], checkpoint)
        return (0 if outcome.ok else 1), list(offline.report(outcome))


@pytest.fixture
async def trail(server_url, tmp_path):
    async with scratch_database(server_url) as url:
        db = await asyncpg.connect(libpq_dsn(url))
        database = Database(url, pool_size=1)
        process = None
        try:
            user_id = await db.fetchval(
                "INSERT INTO users (email, username, hashed_password, role, is_admin)"
                " VALUES ('auditor@relman.example', 'auditor', 'not a hash', 'admin', true)"
                " RETURNING id"
            )
            async with database.transaction() as session:
                token, _ = await issue_token(session, await session.get(User, user_id), "t", None)
            process = await start_service(
                url,
                "audit_svc",
                AUDIT_SEAL_INTERVAL_S="0.05",
                AUDIT_SIGNING_KEY_FILE=str(tmp_path / "keys" / "signing.pem"),
            )
            address = client_address(process.addresses["audit_svc"])
            async with grpc.aio.insecure_channel(address) as channel:
                found = Trail(
                    url, db, audit_pb2_grpc.AuditServiceStub(channel), bearer(token), process, tmp_path
                )
                await found.log(ROWS)
                await found.all_sealed()
                yield found
        finally:
            if process is not None:
                assert await process.stop() == 0, process.output
            await database.dispose()
            await db.close()


async def _row_count(trail: Trail) -> int:
    return await trail.db.fetchval("SELECT count(*) FROM audit_logs")


async def test_an_untouched_trail_verifies_with_every_row_and_seal(trail):
    last = await trail.all_sealed()
    seals = await trail.db.fetchval("SELECT count(*) FROM audit_seals")
    rows = await trail.db.fetchval("SELECT count(*) FROM audit_logs WHERE sequence <= $1", last)
    outcome = await trail.verify()
    assert outcome.ok, outcome.problems
    # The verification's own audit.verify row may land after the last seal: counted or not.
    assert outcome.rows_checked >= rows and outcome.seals_checked >= seals
    status, printed = await trail.offline()
    assert status == 0, printed
    assert printed[0].startswith("ok: ")


async def _first_sequence_of(trail: Trail, tag: str = "seal.test") -> int:
    return await trail.db.fetchval(
        "SELECT min(sequence) + 7 FROM audit_logs WHERE action = $1", tag
    )


async def test_a_changed_field_is_row_modified_at_its_sequence(trail):
    sequence = await _first_sequence_of(trail)
    await trail.tamper(
        "UPDATE audit_logs SET resource_id = 'r-forged' WHERE sequence = $1", args=(sequence,)
    )
    outcome = await trail.verify()
    assert not outcome.ok
    assert [(p.kind, p.sequence) for p in outcome.problems] == [(Kind.ROW_MODIFIED, sequence)]
    status, printed = await trail.offline()
    assert status == 1
    assert printed[0].startswith(f"ROW_MODIFIED (seal ") and f"sequence {sequence})" in printed[0]


async def test_a_deleted_row_is_row_missing_at_its_sequence(trail):
    sequence = await _first_sequence_of(trail)
    await trail.tamper("DELETE FROM audit_logs WHERE sequence = $1", args=(sequence,))
    outcome = await trail.verify()
    assert [(p.kind, p.sequence) for p in outcome.problems] == [(Kind.ROW_MISSING, sequence)]
    status, printed = await trail.offline()
    assert status == 1 and printed[0].startswith("ROW_MISSING") and f"sequence {sequence})" in printed[0]


async def test_the_newest_seals_deleted_with_their_rows_break_the_checkpoint(trail):
    for _ in range(3):  # a seal each
        await trail.log(5)
        await trail.all_sealed()
    checkpoint = await trail.stub.GetAuditCheckpoint(
        audit_pb2.GetAuditCheckpointRequest(), metadata=trail.metadata
    )
    assert checkpoint.seal_number >= 4
    await trail.tamper(
        "DELETE FROM audit_logs WHERE sequence >= (SELECT first_sequence FROM audit_seals"
        " WHERE seal_number = $1)",
        "DELETE FROM audit_seals WHERE seal_number >= $1",
        args=(checkpoint.seal_number - 1,),
    )
    outcome = await trail.verify(
        trusted_seal_number=checkpoint.seal_number, trusted_seal_hash=checkpoint.seal_hash
    )
    assert (outcome.problems[0].kind, outcome.problems[0].seal_number) == (
        Kind.CHECKPOINT_MISMATCH,
        checkpoint.seal_number,
    )
    # Without the checkpoint nothing shows: that is what a kept checkpoint is for.
    assert (await trail.verify()).ok
    text = f"{checkpoint.seal_number}:{base64.b64encode(checkpoint.seal_hash).decode()}"
    status, printed = await trail.offline(text)
    assert status == 1 and printed[0].startswith("CHECKPOINT_MISMATCH")
