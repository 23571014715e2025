"""The framework's ceiling: an aiohttp server that forwards to the upstream with a pooled aiohttp client
and does nothing else (no pipeline, no header allowlists, no Bundle rewriting, no metrics, no logs).

The mediator is built on the same two aiohttp halves; the gap between this and nginx is what the
framework costs, the gap between this and the mediator is what the mediator's own work costs.

Usage: python bench/bare_proxy.py --port 18100 --upstream http://127.0.0.1:18000/api/api_fhir_r4/ --workers 2
       [--tls CERT KEY CA]   TLS that requires a client certificate chained to CA (the mediator's mTLS setup)
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import signal
import ssl

import aiohttp
from aiohttp import web


def build(upstream: str) -> web.Application:
    session_key = web.AppKey("session", aiohttp.ClientSession)

    async def forward(request: web.Request) -> web.Response:
        url = upstream + request.match_info["tail"]
        async with request.app[session_key].get(url, headers={"Accept": "application/json"}) as resp:
            body = await resp.read()
            return web.Response(status=resp.status, body=body, content_type=resp.content_type)

    async def session(app: web.Application):  # type: ignore[no-untyped-def]
        app[session_key] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=128))
        yield
        await app[session_key].close()

    app = web.Application()
    app.cleanup_ctx.append(session)
    app.router.add_get("/fhir/{tail:.*}", forward)
    return app


def tls_context(cert: str, key: str, ca: str) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=ca)
    context.load_cert_chain(cert, key)
    context.verify_mode = ssl.CERT_REQUIRED
    return context


async def serve(port: int, upstream: str, tls: list[str] | None) -> None:
    runner = web.AppRunner(build(upstream), access_log=None)
    await runner.setup()
    context = tls_context(*tls) if tls else None
    await web.TCPSite(runner, "127.0.0.1", port, reuse_port=True, ssl_context=context).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()


def worker(port: int, upstream: str, tls: list[str] | None, uvloop: bool) -> None:
    if uvloop:
        import uvloop as uv

        uv.run(serve(port, upstream, tls))
    else:
        asyncio.run(serve(port, upstream, tls))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--tls", nargs=3, metavar=("CERT", "KEY", "CA"))
    parser.add_argument("--uvloop", action="store_true", help="libuv's event loop (the mediator's --event-loop uvloop)")
    args = parser.parse_args()
    processes = [multiprocessing.Process(target=worker, args=(args.port, args.upstream, args.tls, args.uvloop))
                 for _ in range(args.workers)]
    for process in processes:
        process.start()
    for process in processes:
        process.join()


if __name__ == "__main__":
    main()
