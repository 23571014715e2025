"""A fault injector in front of the openIMIS stand-in: the real sandbox answers, but a test can make it
hold requests (slow openIMIS) or answer 502 (failing openIMIS). openIMIS's slowness cannot be produced
on demand here, so this is the one fake, and only of timing and failure, not of content."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from aiohttp import web

from mediator.sandbox import OpenImisSandbox, build_sandbox_app


@dataclass
class Faults:
    mode: str = "ok"
    """ok | hold (wait for `gate`) | fail502"""
    gate: asyncio.Event = field(default_factory=asyncio.Event)
    held: int = 0
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    forwarded: list[tuple[str, str]] = field(default_factory=list)
    """(method, path) of every non-login request that got past the injector to the sandbox."""


def faulty_sandbox_app(sandbox: OpenImisSandbox, faults: Faults) -> web.Application:
    @web.middleware
    async def inject(request: web.Request, handler):  # type: ignore[no-untyped-def]
        if request.path.endswith("/login/"):
            return await handler(request)
        if faults.mode == "fail502":
            return web.json_response({"resourceType": "OperationOutcome", "issue": []}, status=502)
        if faults.mode == "hold":
            faults.held += 1
            faults.arrived.set()
            await faults.gate.wait()
        faults.forwarded.append((request.method, request.path))
        return await handler(request)

    app = build_sandbox_app(sandbox)
    app.middlewares.append(inject)
    return app
