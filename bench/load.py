"""Closed-loop load: N callers, each starting its next call when the last one answered."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Load:
    calls: int
    elapsed_s: float
    latencies_s: list[float]

    @property
    def rate(self) -> float:
        return self.calls / self.elapsed_s

    def percentile_ms(self, q: float) -> float:
        return percentile(self.latencies_s, q) * 1000

    @classmethod
    def merged(cls, loads: list[Load]) -> Load:
        """Several rounds of one load as one: their calls, time and latencies together."""
        return cls(
            sum(load.calls for load in loads),
            sum(load.elapsed_s for load in loads),
            [latency for load in loads for latency in load.latencies_s],
        )


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..1) of `values`."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def closed_loop(
    call: Callable[[], Awaitable[object]], concurrency: int, duration_s: float, warmup_s: float
) -> Load:
    """Runs `call` from `concurrency` callers; measures only after `warmup_s`."""
    latencies: list[float] = []
    measuring = False
    stopping = False

    async def caller() -> None:
        while not stopping:
            started = time.perf_counter()
            await call()
            if measuring:
                latencies.append(time.perf_counter() - started)

    callers = [asyncio.create_task(caller()) for _ in range(concurrency)]
    try:
        await asyncio.sleep(warmup_s)
        measuring, began = True, time.perf_counter()
        await asyncio.sleep(duration_s)
        measuring, stopping = False, True
        elapsed = time.perf_counter() - began
        await asyncio.gather(*callers)
    finally:
        for task in callers:
            task.cancel()
    return Load(len(latencies), elapsed, latencies)
