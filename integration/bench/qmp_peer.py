#!/usr/bin/env python3
"""The peer of `weft-bench qmp`: QEMU's own Python QMP library, qemu.qmp.

Connects to a QMP unix socket, runs `query-status` N times one after another and then
N times from 8 concurrent workers on the same connection (asyncio.gather), disconnects,
and prints the timings as one JSON object on stdout. Only the calls are timed, not the
interpreter start, the import or the connection.

    python3 integration/bench/qmp_peer.py --socket /path/qmp.sock --calls 2000

Needs `pip install qemu.qmp` (`make bench` does this).
"""

import argparse
import asyncio
import json
import logging
import sys
import time
from importlib import metadata

from qemu.qmp import QMPClient


async def run(socket_path: str, calls: int, workers: int) -> dict:
    qmp = QMPClient("weft-bench-peer")
    t0 = time.perf_counter()
    await qmp.connect(socket_path)
    connect_s = time.perf_counter() - t0
    try:
        t0 = time.perf_counter()
        for _ in range(calls):
            await qmp.execute("query-status")
        sequential_s = time.perf_counter() - t0

        per_worker = calls // workers

        async def worker() -> None:
            for _ in range(per_worker):
                await qmp.execute("query-status")

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(workers)))
        concurrent_s = time.perf_counter() - t0
    finally:
        await qmp.disconnect()
    return {
        "peer": "qemu.qmp " + metadata.version("qemu.qmp"),
        "python": sys.version.split()[0],
        "connect_s": connect_s,
        "sequential_calls": calls,
        "sequential_s": sequential_s,
        "concurrent_calls": per_worker * workers,
        "concurrent_s": concurrent_s,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--socket", required=True, help="QMP unix socket path")
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--workers", type=int, default=8)
    args = ap.parse_args()
    # qemu.qmp logs at DEBUG through the logging module; keep stdout for the JSON.
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    result = asyncio.run(run(args.socket, args.calls, args.workers))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
