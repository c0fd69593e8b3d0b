"""Clients polling the status page's ``/status.json`` as fast as it answers, in a process of their own.

    python bench/_poller.py PORT CLIENTS

Polls until stdin closes, then prints how many documents were read.
"""

from __future__ import annotations

import asyncio
import sys


async def poll(port: int, stop: asyncio.Event, counts: list[int]) -> None:
    """One client: GET /status.json, read it whole, again."""
    while not stop.is_set():
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /status.json HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            await writer.drain()
            await reader.read()
            writer.close()
            counts[0] += 1
        except OSError:
            await asyncio.sleep(0.05)


async def main() -> None:
    """Run the clients until stdin closes."""
    port, clients = int(sys.argv[1]), int(sys.argv[2])
    stop = asyncio.Event()
    counts = [0]
    tasks = [asyncio.create_task(poll(port, stop, counts)) for _ in range(clients)]
    print("polling", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    stop.set()
    await asyncio.wait(tasks, timeout=30)
    print(counts[0], flush=True)


if __name__ == "__main__":
    asyncio.run(main())
