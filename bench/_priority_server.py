"""The server under test for bench/priority.py: `embedpool serve` as a process of its own, with the pool's
priority classes on or off (off, one queue for all work, is a baseline that no setting offers).

    python -P bench/_priority_server.py on|off '{"data_dir": ..., "model": ..., ...}'

The JSON holds embedpool Settings fields. Prints {"port", "metrics_port", "database_url"} as one line on stdout
once serving; SIGTERM drains and stops it (and its embedded Postgres, if it started one).
"""

from __future__ import annotations

import json
import signal
import sys
from functools import partial
from pathlib import Path

import anyio

from embedpool.config import Settings
from embedpool.logs import configure
from embedpool.server.app import Running, serve


async def _main(settings: Settings, priorities: bool) -> None:
    stop = anyio.Event()
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with anyio.create_task_group() as tg:
            running: Running = await tg.start(partial(serve, settings, stop, priorities=priorities))
            ready = {"port": running.port, "metrics_port": running.metrics_port, "database_url": running.database_url}
            print(json.dumps(ready), flush=True)
            async for _ in signals:
                stop.set()
                break


if __name__ == "__main__":
    mode, raw = sys.argv[1], json.loads(sys.argv[2])
    if mode not in ("on", "off"):
        raise SystemExit(f"usage: {sys.argv[0]} on|off SETTINGS_JSON (got {mode!r})")
    settings = Settings(**{name: Path(value) if name == "data_dir" else value for name, value in raw.items()})
    configure(settings.log_level, "json")
    anyio.run(_main, settings, mode == "on", backend="asyncio")
