"""Admin HTTP API (aiohttp), bound to 127.0.0.1 unless configured otherwise.

GET  /metrics            Prometheus text from the balancer's own registry
GET  /endpoints          JSON rows: state, EWMA, outstanding, ejections per endpoint
GET  /healthz            200 "ok" while serving, 503 "draining" after drain started
GET  /config             the effective config as JSON
POST /drain              start draining the whole balancer (it exits when done)
POST /endpoints          {"pool", "address", "weight"?, "http"?}: add an endpoint (source "admin"); ``http`` is
                         the replica's HTTP (REST) address, for the REST listener
DELETE /endpoints        {"pool", "address"} (or query string): remove it
POST /endpoints/drain    {"pool", "address"}: stop new picks, let in-flight finish
POST /endpoints/undrain  {"pool", "address"}: undo a drain
GET  /pools/{pool}/demand?wait=S   {"pool", "held", "endpoints", "routable"}; with ``wait`` the answer
                         waits up to S s (at most 60) for a request to be held (scale from zero)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from modelyard.balancer.config import host_port_ok

if TYPE_CHECKING:
    from modelyard.balancer.app import Balancer


def _bad(msg: str, status: int = 400) -> web.Response:
    return web.json_response({"error": msg}, status=status)


def build_admin_app(b: Balancer) -> web.Application:
    """The aiohttp application serving the admin API of balancer ``b``."""

    async def metrics(_: web.Request) -> web.Response:
        body = generate_latest(b.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def endpoints(_: web.Request) -> web.Response:
        return web.json_response({"draining": b.draining, "endpoints": b.endpoint_rows()})

    async def healthz(_: web.Request) -> web.Response:
        if b.draining:
            return web.Response(status=503, text="draining\n")
        return web.Response(text="ok\n")

    async def config(_: web.Request) -> web.Response:
        return web.json_response(b.config_dict())

    async def drain(_: web.Request) -> web.Response:
        b.begin_drain()
        return web.json_response({"draining": True}, status=202)

    async def target(request: web.Request) -> tuple[dict[str, Any], Any] | web.Response:
        data: dict[str, Any] = dict(request.query)
        if request.can_read_body:
            try:
                body = await request.json()
            except ValueError:
                return _bad("body must be JSON")
            if not isinstance(body, dict):
                return _bad("body must be a JSON object")
            data.update(body)
        pool = b.pools.get(str(data.get("pool", "")))
        if pool is None:
            return _bad(f"unknown pool {data.get('pool')!r} (known: {', '.join(b.pools)})", 404)
        if not isinstance(data.get("address"), str) or not host_port_ok(data["address"]):
            return _bad("address must be host:port")
        return data, pool

    async def add(request: web.Request) -> web.Response:
        t = await target(request)
        if isinstance(t, web.Response):
            return t
        data, pool = t
        try:
            weight = float(data.get("weight", 1.0))
        except (TypeError, ValueError):
            return _bad("weight must be a number")
        if weight <= 0:
            return _bad("weight must be > 0")
        http = data.get("http")
        if http is not None and (not isinstance(http, str) or not host_port_ok(http)):
            return _bad("http must be host:port (the replica's HTTP address)")
        pool.add(data["address"], weight, source="admin", http=http)
        return web.json_response({"added": data["address"], "pool": pool.name})

    async def remove(request: web.Request) -> web.Response:
        t = await target(request)
        if isinstance(t, web.Response):
            return t
        data, pool = t
        if not pool.remove(data["address"]):
            return _bad(f"{data['address']} is not in pool {pool.name!r}", 404)
        return web.json_response({"removed": data["address"], "pool": pool.name})

    def set_drain(flag: bool) -> Any:
        async def handler(request: web.Request) -> web.Response:
            t = await target(request)
            if isinstance(t, web.Response):
                return t
            data, pool = t
            if not pool.set_draining(data["address"], flag):
                return _bad(f"{data['address']} is not in pool {pool.name!r}", 404)
            return web.json_response({"address": data["address"], "pool": pool.name, "draining": flag})
        return handler

    async def demand(request: web.Request) -> web.Response:
        pool = b.pools.get(request.match_info["pool"])
        if pool is None:
            return _bad(f"unknown pool {request.match_info['pool']!r} (known: {', '.join(b.pools)})", 404)
        try:
            wait = min(60.0, max(0.0, float(request.query.get("wait", "0"))))
        except ValueError:
            return _bad("wait must be a number of seconds")
        if not b.held(pool.name):
            await pool.wait_demand(wait)
        return web.json_response({"pool": pool.name, "held": b.held(pool.name), "endpoints": len(pool.endpoints),
                                  "routable": len(pool.snapshot)})

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/endpoints", endpoints)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/config", config)
    app.router.add_post("/drain", drain)
    app.router.add_post("/endpoints", add)
    app.router.add_delete("/endpoints", remove)
    app.router.add_post("/endpoints/drain", set_drain(True))
    app.router.add_post("/endpoints/undrain", set_drain(False))
    app.router.add_get("/pools/{pool}/demand", demand)
    return app


class AdminClient:
    """The client side of this API (the autoscaler's local actuator, ``modelyard up``)."""

    def __init__(self, address: str, session: Any = None, timeout: float = 5.0) -> None:
        import aiohttp

        self.base = f"http://{address}"
        self._session: aiohttp.ClientSession | None = session
        self._own = session is None
        self._timeout = aiohttp.ClientTimeout(total=timeout)

    async def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        import aiohttp

        if self._session is None:
            self._session = aiohttp.ClientSession()
        async with self._session.request(method, self.base + path, json=body, timeout=self._timeout) as r:
            data = await r.json(content_type=None)
            if r.status >= 400:
                raise RuntimeError(f"{method} {path}: HTTP {r.status}: {data.get('error') if isinstance(data, dict) else data}")
            return data

    async def add(self, pool: str, address: str, weight: float = 1.0, http: str | None = None) -> None:
        body: dict[str, Any] = {"pool": pool, "address": address, "weight": weight}
        if http:
            body["http"] = http
        await self._call("POST", "/endpoints", body)

    async def drain(self, pool: str, address: str) -> None:
        await self._call("POST", "/endpoints/drain", {"pool": pool, "address": address})

    async def remove(self, pool: str, address: str) -> None:
        await self._call("DELETE", "/endpoints", {"pool": pool, "address": address})

    async def endpoints(self) -> list[dict[str, Any]]:
        return list((await self._call("GET", "/endpoints"))["endpoints"])

    async def demand(self, pool: str, wait: float) -> dict[str, Any]:
        """Long-poll: returns once the pool holds a request, or after ``wait`` seconds."""
        import aiohttp

        if self._session is None:
            self._session = aiohttp.ClientSession()
        timeout = aiohttp.ClientTimeout(total=wait + 5.0)
        async with self._session.get(f"{self.base}/pools/{pool}/demand", params={"wait": str(wait)},
                                     timeout=timeout) as r:
            return dict(await r.json())

    async def close(self) -> None:
        if self._own and self._session is not None:
            await self._session.close()
            self._session = None
