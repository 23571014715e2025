"""Helpers for the load-protection tests: a real Redis (the shared one on 6379, with a key prefix unique
per test, or a private redis-server on a free port that a test may kill) and real mediator processes."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from mediator.bulkhead import Bulkhead
from mediator.concurrency_limit import GradientLimit

SHARED_REDIS = "redis://127.0.0.1:6379/0"


def minimum_rtt_measured(bulkhead: Bulkhead, rtt_s: float = 0.01) -> None:
    """End an adaptive bulkhead's starting minimum-RTT measurement (it runs at 1 in flight, not at a
    fractional floor), so its limit is the configured one from then on."""
    assert isinstance(bulkhead.limit, GradientLimit)
    for _ in range(bulkhead.limit.params.probe_samples):
        bulkhead.limit.record(rtt_s)
    assert not bulkhead.limit.probing


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def shared_redis_available() -> bool:
    try:
        return bool(redis.Redis.from_url(SHARED_REDIS, socket_connect_timeout=0.5).ping())
    except redis.RedisError:
        return False


@pytest.fixture
def redis_prefix() -> Iterator[str]:
    """A key prefix of our own on the shared Redis; every key under it is deleted afterwards."""
    if not shared_redis_available():
        pytest.fail("the shared Redis on 127.0.0.1:6379 is not reachable (run `make redis`)")
    prefix = f"test-{uuid.uuid4().hex}:"
    yield prefix
    client = redis.Redis.from_url(SHARED_REDIS)
    keys = list(client.scan_iter(match=prefix + "*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


def redis_server_section(url: str, prefix: str) -> str:
    return f"redis:\n  url: {url}\n  key_prefix: \"{prefix}\"\n  timeout_s: 0.3\n  connect_timeout_s: 0.3\n"


@contextlib.contextmanager
def private_redis() -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A redis-server of our own on a free port (tests may kill it; never the shared one)."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed (run `make redis`)")
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="mediator-redis-")
    process = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                "--appendonly", "no", "--dir", workdir],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        client = redis.Redis(port=port, socket_connect_timeout=0.2)
        for _ in range(100):
            try:
                if client.ping():
                    break
            except redis.RedisError:
                time.sleep(0.05)
        else:
            pytest.fail("private redis-server did not start")
        client.close()
        yield f"redis://127.0.0.1:{port}/0", process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)
        shutil.rmtree(workdir, ignore_errors=True)


@contextlib.contextmanager
def mediator_process(config_dir: Path, port: int) -> Iterator[subprocess.Popen[bytes]]:
    """`openimis-mediator serve` as a real subprocess, stopped (SIGTERM, then SIGKILL) afterwards."""
    log_path = config_dir / f"mediator-{port}.log"
    log = log_path.open("wb")
    process = subprocess.Popen([sys.executable, "-m", "mediator", "--log-level", "WARNING", "serve",
                                "--config", str(config_dir), "--host", "127.0.0.1", "--port", str(port)],
                               env=dict(os.environ), stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if process.poll() is not None:
                pytest.fail(f"mediator exited: {log_path.read_text()}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
                break
            time.sleep(0.05)
        else:
            pytest.fail("mediator did not start listening")
        yield process
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
        log.close()
