"""The audit group commit when the database refuses a whole batch (an injected fault).

No valid row makes the batch's one INSERT fail, so the test injects the fault: a
trigger that refuses rows of one action with a serialization failure (40001, which
the API answers ABORTED). The batch holding that row is refused as a whole; the
group commit must then write its rows one by one, so that only the row at fault
fails its caller.
"""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import grpc

from relman.v1 import audit_pb2, audit_pb2_grpc
from shared.persistence.db import libpq_dsn
from tests.harness import bearer, client_address, start_service

CALLS = 64
POISON = "fault.poison"


async def test_a_batch_refused_as_a_whole_fails_only_the_row_at_fault(
    fault_db, fault_tokens, fault_report
):
    db = await asyncpg.connect(libpq_dsn(fault_db))
    await db.execute(
        f"""
        CREATE FUNCTION fault_poison() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN RAISE EXCEPTION 'injected fault' USING ERRCODE = '40001'; END $$;
        CREATE TRIGGER fault_poison BEFORE INSERT ON audit_logs
            FOR EACH ROW WHEN (NEW.action = '{POISON}') EXECUTE FUNCTION fault_poison();
        """
    )
    audit = await start_service(fault_db, "audit_svc")
    results = []
    try:
        async with grpc.aio.insecure_channel(client_address(audit.addresses["audit_svc"])) as ch:
            stub = audit_pb2_grpc.AuditServiceStub(ch)

            async def log(action: str, request_id: str):
                try:
                    await stub.LogAction(
                        audit_pb2.LogActionRequest(
                            action=action, resource_type="fault", request_id=request_id
                        ),
                        metadata=bearer(fault_tokens["ci-bot"]),
                        timeout=10,
                    )
                    return request_id, "OK"
                except grpc.aio.AioRpcError as error:
                    return request_id, error.code().name

            for _ in range(3):  # a lone first call is flushed alone; the rest queue behind it
                ids = [str(uuid.uuid4()) for _ in range(CALLS)]
                actions = ["fault.batch"] * CALLS
                actions[CALLS // 2] = POISON
                results += await asyncio.gather(*map(log, actions, ids))
    finally:
        await audit.stop()
        await db.execute("DROP TRIGGER fault_poison ON audit_logs; DROP FUNCTION fault_poison()")
    ok = [request_id for request_id, code in results if code == "OK"]
    refused = [code for _, code in results if code != "OK"]
    stored = await db.fetchval(
        """SELECT count(*) FROM audit_requests q
           JOIN audit_logs a ON a.created_at = q.audit_created_at AND a.id = q.audit_id
           WHERE q.request_id = ANY($1::uuid[])""",
        ok,
    )
    await db.close()
    assert refused == ["ABORTED"] * 3
    assert len(ok) == 3 * (CALLS - 1) and stored == len(ok)
    fallbacks = audit.output.count("writing them one by one")
    assert fallbacks >= 1, audit.output
    assert "unexpected error" not in audit.output
    fault_report(
        f"3 rounds of {CALLS} concurrent LogAction calls, one row per round refused by an "
        f"injected trigger fault: {fallbacks} batches refused as a whole and rewritten row by "
        f"row; the 3 rows at fault ABORTED, the other {len(ok)} OK and stored"
    )
