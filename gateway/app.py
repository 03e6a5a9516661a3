"""The aiohttp application: routes, shared state, headers, startup.

Template context for ``index.html`` (the whole of it, on purpose):

* ``version``: the package version, e.g. for cache-busting asset URLs.
"""

from __future__ import annotations

import errno
import logging
from pathlib import Path

import aiohttp_jinja2
import jinja2
from aiohttp import hdrs, web

import gateway
from gateway import policy
from gateway.bridge import Bridge
from gateway.config import GatewayConfig
from gateway.health import HealthProbe, HealthView
from gateway.metrics import Metrics

log = logging.getLogger(__name__)

# --- application state, all of it ----------------------------------------
CONFIG = web.AppKey("config", GatewayConfig)
METRICS = web.AppKey("metrics", Metrics)
BRIDGE = web.AppKey("bridge", Bridge)
PROBE = web.AppKey("probe", HealthProbe)
TEMPLATES_DIR = web.AppKey("templates_dir", Path)
STATIC_DIR = web.AppKey("static_dir", Path)
SERVED = web.AppKey("served", policy.ServedHosts)

# Probed by monitors, which may use any address of the machine; an IP
# literal in Host cannot be a DNS rebinding, so these accept any.
MONITOR_PATHS = frozenset({"/health", "/metrics"})

# connect-src 'self' admits same-origin ws:/wss: in current browsers (CSP
# level 3); the page needs nothing from any other origin.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; connect-src 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def asset_dirs() -> tuple[Path, Path]:
    """Return (templates, static) directories.

    An installed wheel carries them inside the package (pyproject's
    force-include); a source or editable checkout has them at the top of the
    repository.  The package copy wins when both exist.
    """
    package = Path(gateway.__file__).resolve().parent
    for base in (package, package.parent):
        if (base / "templates").is_dir():
            return base / "templates", base / "static"
    return package / "templates", package / "static"


def create_app(config: GatewayConfig | None = None) -> web.Application:
    """Build the gateway application for ``config`` (defaults if None).

    Raises FileNotFoundError if the page's templates or static files are
    missing, since the gateway would serve a broken page without them.
    """
    config = config or GatewayConfig()
    templates_dir, static_dir = asset_dirs()
    for directory in (templates_dir, static_dir):
        if not directory.is_dir():
            raise FileNotFoundError(f"gateway assets missing: no directory {directory}")

    # The Host check comes first, so nothing (not even a 404) answers a
    # request for a name we do not serve.
    app = web.Application(middlewares=[_check_host])
    metrics = Metrics()
    bridge = Bridge(config, metrics)
    probe = HealthProbe(config)
    app[CONFIG] = config
    app[METRICS] = metrics
    app[BRIDGE] = bridge
    app[PROBE] = probe
    app[TEMPLATES_DIR] = templates_dir
    app[STATIC_DIR] = static_dir
    app[SERVED] = policy.served_hosts(config.host, config.server_names, config.allowed_origins)

    # autoescape is on for every template: names and text are user input.
    aiohttp_jinja2.setup(app, loader=jinja2.FileSystemLoader(templates_dir), autoescape=True)
    sessions = ((lambda: bridge.session_count) if metrics.multiprocess_dir is None
                else metrics.sessions_open)  # with --workers: all workers' sessions
    health = HealthView(probe, sessions, gateway.__version__)
    app.router.add_get("/", _index)
    app.router.add_get("/ws", bridge.handle)
    app.router.add_get("/health", health.handle)
    app.router.add_get("/metrics", _metrics)
    app.router.add_static("/static/", static_dir)
    # A signal rather than a middleware: it also reaches responses prepared
    # inside handlers (the WebSocket upgrade) and aiohttp's own error pages.
    app.on_response_prepare.append(_security_headers)
    app.on_shutdown.append(bridge.shutdown)
    app.on_cleanup.append(probe.close)
    return app


@web.middleware
async def _check_host(request: web.Request, handler) -> web.StreamResponse:
    """Refuse a request whose Host we do not serve (``policy.ServedHosts``).

    The defence against DNS rebinding (RFC 6455 §10.2; origins per RFC
    6454): 403 on ``/ws`` before the upgrade, 421 Misdirected Request
    (RFC 9110 §15.5.20) for everything else.
    """
    host = request.headers.get(hdrs.HOST)
    if request.app[SERVED].allows(host, any_address=request.path in MONITOR_PATHS):
        return await handler(request)
    shown = (host or "")[:100]
    log.info("refused %s %s for Host %r", request.method, request.path[:100], shown)
    if request.path == "/ws":
        raise web.HTTPForbidden(text=f"WebSocket refused: {shown!r} is not a name this "
                                "gateway serves")
    raise web.HTTPMisdirectedRequest(
        text=f"this gateway does not serve {shown!r}; if it should, start it with "
        "--server-name NAME\n")


async def _index(request: web.Request) -> web.Response:
    return aiohttp_jinja2.render_template(
        "index.html", request, {"version": gateway.__version__})


async def _metrics(request: web.Request) -> web.Response:
    return request.app[METRICS].render()


async def _security_headers(request: web.Request, response: web.StreamResponse) -> None:
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)


def bind_error(host: str, port: int, exc: OSError) -> str:
    """One line for the operator on why the HTTP port could not be bound."""
    if exc.errno == errno.EADDRINUSE:
        return f"HTTP port {port} is busy"
    return f"cannot serve on {host}:{port}: {exc.strerror or exc}"


async def start(config: GatewayConfig) -> tuple[web.AppRunner, str]:
    """Serve ``config`` on its host and port; return the runner and the URL.

    Logs ``serving on http://HOST:PORT/`` with the bound port (so port 0
    works).  The caller stops it with ``runner.cleanup()``.  Raises OSError
    if the port cannot be bound, FileNotFoundError as ``create_app`` does.
    """
    runner = web.AppRunner(create_app(config), shutdown_timeout=5.0)
    await runner.setup()
    # Workers share the port: the kernel spreads new connections over them.
    site = web.TCPSite(runner, config.host, config.http_port,
                       reuse_port=config.workers > 1 or None)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    host, port = runner.addresses[0][:2]
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}/"
    log.info("serving on %s", url)
    return runner, url
