"""Real processes and real upstreams for the operations tests: `openimis-mediator serve` as a child
process, a deliberately slow openIMIS stand-in in the test's own event loop, ports, waiting helpers."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from aiohttp import web

from tests.conftest import SANDBOX_USER

SLOW_SECONDS = 1.0


class SlowOpenImis:
    """An openIMIS stand-in whose `Claim/` search answers after SLOW_SECONDS; `arrived` is set when a
    slow request reaches it (so a test knows the request is in flight)."""

    def __init__(self) -> None:
        self.arrived = asyncio.Event()
        self.request_ids: list[str] = []

    async def login(self, request: web.Request) -> web.Response:
        return web.json_response({"token": "stand-in-token", "exp": int(time.time()) + 3600})

    async def resource(self, request: web.Request) -> web.Response:
        self.request_ids.append(request.headers.get("X-Request-ID", ""))
        if request.match_info["rtype"] == "Claim":
            self.arrived.set()
            await asyncio.sleep(SLOW_SECONDS)
        return web.json_response({"resourceType": "Bundle", "type": "searchset", "total": 0})

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/api/api_fhir_r4/login/", self.login)
        app.router.add_get("/api/api_fhir_r4/{rtype}/", self.resource)
        return app


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def free_consecutive_ports(count: int) -> int:
    """A port p such that p .. p+count-1 are all free now."""
    for _ in range(50):
        base = free_port()
        socks = []
        try:
            for offset in range(count):
                sock = socket.socket()
                socks.append(sock)
                sock.bind(("127.0.0.1", base + offset))
            return base
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
    raise RuntimeError("no consecutive free ports")


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


async def eventually(check: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    """Wait for something another process or task does; fails the test if it never happens."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


@contextmanager
def mediator_process(config_dir: Path, *args: str, log_file: Path) -> Iterator[subprocess.Popen[bytes]]:
    """`openimis-mediator serve --config DIR ARGS` as a child; always stopped (SIGKILL as a last resort)."""
    env = {**os.environ, **SANDBOX_USER}
    with open(log_file, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "mediator", "serve", "--config", str(config_dir), *args],
                                stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            yield proc
        finally:
            stop_process(proc)


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL after 15 s: a child process is always gone afterwards."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def wait_exit(proc: subprocess.Popen[bytes], timeout: float = 15.0) -> int:
    await eventually(lambda: proc.poll() is not None, timeout, f"pid {proc.pid} to exit")
    return int(proc.returncode)
