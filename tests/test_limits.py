"""Back-pressure primitives, in-process: bounded admission and per-key rate limits."""

from __future__ import annotations

import asyncio

import pytest

from serving.errors import APIError
from serving.limits import Admission, RateLimiter


def test_admission_burst_admits_running_plus_queue_and_refuses_the_rest():
    async def main():
        adm = Admission(running=4, queue=4, timeout_s=30)
        peak = 0

        async def one():
            nonlocal peak
            try:
                async with adm.slot():
                    peak = max(peak, adm.active)
                    await asyncio.sleep(0.2)
                return 200
            except APIError as exc:
                assert exc.headers["Retry-After"] == "1"
                return exc.status

        codes = await asyncio.gather(*[one() for _ in range(14)])
        return codes, peak, adm.active, adm.waiting

    codes, peak, active, waiting = asyncio.run(main())
    assert codes.count(200) == 8 and codes.count(429) == 6
    assert peak == 4 and active == 0 and waiting == 0


def test_admission_queue_timeout_is_429():
    async def main():
        adm = Admission(running=1, queue=1, timeout_s=0.1)

        async def hold():
            async with adm.slot():
                await asyncio.sleep(0.5)

        holder = asyncio.create_task(hold())
        await asyncio.sleep(0.01)
        with pytest.raises(APIError) as err:
            async with adm.slot():
                pass
        await holder
        return err.value

    err = asyncio.run(main())
    assert err.status == 429 and err.code == "queue_timeout"


def test_rate_limiter_per_key_with_retry_after():
    rl = RateLimiter(per_min=3)
    for _ in range(3):
        rl.check("a")
    with pytest.raises(APIError) as err:
        rl.check("a")
    assert err.value.status == 429 and int(err.value.headers["Retry-After"]) >= 1
    rl.check("b")  # other keys are unaffected
    RateLimiter(per_min=0).check("a")  # off
