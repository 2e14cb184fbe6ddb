"""AsyncSandbox: commands awaited on the event loop itself."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from tests.conftest import require_image, require_tier
from tierbox import AsyncSandbox


def test_a_hundred_concurrent_runs_on_one_loop() -> None:
    require_tier("container")
    require_tier("wasm")
    require_image("busybox")

    async def main() -> None:
        async with (
            await AsyncSandbox.create("busybox", tier="container") as c,
            await AsyncSandbox.create("micropython:wasi", tier="wasm") as w,
        ):
            threads_before = threading.active_count()
            runs = [c.run(["echo", f"c{i}"]) for i in range(50)]
            runs += [w.run(["micropython", "-c", f"print('w{i}')"]) for i in range(50)]
            results = await asyncio.gather(*runs)
            outs = sorted(r.stdout_text.strip() for r in results)
            assert outs == sorted([f"c{i}" for i in range(50)] + [f"w{i}" for i in range(50)])
            assert all(r.ok for r in results)
            # container commands are waited for by the loop, not by threads
            assert threading.active_count() - threads_before < 60

    asyncio.run(main())


@pytest.mark.parametrize(("tier", "image"), [("container", "busybox"), ("process", None)])
def test_streaming_iteration_and_background(tier: str, image: str | None) -> None:
    require_tier(tier)

    async def main() -> None:
        async with await AsyncSandbox.create(image, tier=tier) as sb:
            got = []
            t0 = time.monotonic()
            async for stream, chunk in sb.stream(["sh", "-c", "echo a; sleep 0.4; echo b >&2"]):
                got.append((stream, chunk, time.monotonic() - t0))
            assert [(s, c) for s, c, _ in got] == [("stdout", b"a\n"), ("stderr", b"b\n")]
            assert got[0][2] < 0.35  # the first line came before the command ended
            h = await sb.run(["cat"], background=True)
            h.send_stdin("over the loop")
            h.close_stdin()
            assert (await h.wait(10)).stdout == b"over the loop"
            slow = await sb.run(["sleep", "30"], background=True)
            with pytest.raises(asyncio.TimeoutError):
                await slow.wait(0.2)
            slow.kill()
            assert (await slow.wait(10)).termination.signal == 9
            await sb.files.write("/tmp/f.txt", "x")
            assert await sb.files.read_text("/tmp/f.txt") == "x"

    asyncio.run(main())
