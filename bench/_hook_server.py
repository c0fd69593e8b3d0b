"""A FastAGI server in a process of its own for the hook benchmarks (the client must not share its CPU).

    python bench/_hook_server.py floor
    python bench/_hook_server.py bridge DATABASE_URL LICENCES [NODE [WEB_PORT]]

``floor``: the least any FastAGI hook can do: read the AGI environment, send one SET VARIABLE,
read the reply, close. ``bridge``: the bridge's own hook (:class:`FastAgiServer` with a started
:class:`BridgeService`, logging at INFO as in production) on a database the caller provisioned;
with ``WEB_PORT`` also the status page in the same process, as ``forum-bridge run`` serves it.
Prints the port on the first line of stdout, then serves until stdin closes.
"""

from __future__ import annotations

import asyncio
import logging
import sys

import _common  # noqa: F401  (puts the project on sys.path)


async def floor_server() -> asyncio.Server:
    """The floor: no decision at all, one command."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while (await reader.readline()) not in (b"\n", b""):
                pass
            writer.write(b'SET VARIABLE FORUM_BRIDGE_RESULT "allow"\n')
            await writer.drain()
            await reader.readline()
        finally:
            writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


async def main() -> None:
    """Serve until stdin closes."""
    mode = sys.argv[1]
    closers = []
    if mode == "floor":
        server = await floor_server()
        port = server.sockets[0].getsockname()[1]
        closers.append(server.close)
    else:
        from forum_bridge.adapters.asterisk.agi import FastAgiServer
        from forum_bridge.adapters.asterisk.ami import RecentDecisions
        from forum_bridge.config import load_settings
        from forum_bridge.logsetup import configure_logging
        from forum_bridge.service import BridgeService
        from forum_bridge.store.database import Database

        url, licences = sys.argv[2], int(sys.argv[3])
        node = sys.argv[4] if len(sys.argv) > 4 else "bench"
        web_port = int(sys.argv[5]) if len(sys.argv) > 5 else 0
        settings = load_settings(
            environ={},
            overrides={
                "database.url": url,
                "licences.count": licences,
                "node.name": node,
                "asterisk.agi_port": 0,
                "web.port": web_port,
            },
        )
        configure_logging("INFO", [])
        logging.getLogger("alembic").setLevel(logging.WARNING)
        service = BridgeService(settings, Database(url))
        service.start()
        if web_port:
            from forum_bridge.web.server import start_web

            web = start_web(service, settings, None)
            closers.append(web.stop)
        hook = FastAgiServer(settings, service, decisions=RecentDecisions())
        await hook.start()
        port = hook.port
        closers.append(lambda: asyncio.ensure_future(hook.close()))
    print(port, flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.read)
    for close in closers:
        close()


if __name__ == "__main__":
    asyncio.run(main())
