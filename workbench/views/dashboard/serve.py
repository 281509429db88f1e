"""Serving the dashboard: :func:`serve` (what ``workbench serve`` calls) and the configuration that
``panel serve apps/dashboard.py --args ...`` reads.

Binds 127.0.0.1 unless told otherwise; ``/liveness`` answers when the server is up. Authentication is
Panel's own: ``basic_auth`` (a password, or a JSON file of user → password) with a ``cookie_secret``,
or ``oauth_provider`` + ``oauth_key`` / ``oauth_secret`` / ``oauth_redirect_uri`` / ``cookie_secret`` /
``oauth_encryption_key`` (see apps/README.md).

Exposure: the dashboard runs models for whoever reaches it, so it never serves beyond loopback without
authentication. :func:`serve` refuses such a configuration before anything loads; under
``panel serve apps/dashboard.py`` (whose sockets Panel opens before the app runs) the app looks at the
sockets its server actually listens on and, when one is not loopback and no auth is configured,
shows every visitor a refusal instead of the dashboard (:func:`exposure_problem`). Websocket handshakes
without an ``Origin`` header are refused too (:func:`require_websocket_origin`), and so is every request whose
``Host`` header is not a loopback name (or, with authentication, a configured one): :func:`require_known_host`.
"""

from __future__ import annotations

import argparse
import errno
import gc
import ipaddress
import logging
import os
import sys
from dataclasses import fields
from pathlib import Path
from typing import Sequence

from .state import Caps, DashboardError, Workbench, shared

log = logging.getLogger("workbench.dashboard")  # the logger keeps its name from before the views folder
DEFAULT_PORT = 5006
# the largest websocket message a browser may send (Bokeh's default is 20 MB); the biggest legitimate one is a
# prompt at the character cap (Caps.max_prompt_chars, 60,000 characters ≈ 240 KB as UTF-8)
MAX_MESSAGE_BYTES = 2 * 1024 * 1024


def parser() -> argparse.ArgumentParser:
    """Options of ``panel serve apps/dashboard.py --args ...``: ``--model`` / ``--moe`` / ``--runs`` as in
    ``workbench serve``, and one ``--max-...`` option per :class:`Caps` field (``workbench serve`` has only two)."""
    p = argparse.ArgumentParser(prog="apps/dashboard.py", description="workbench dashboard options")
    p.add_argument("--model", default=None, help="main model source (default: the embedded SmolLM2)")
    p.add_argument(
        "--moe",
        action="append",
        default=None,
        help="MoE model source for the Routing tab (repeatable; default tiny-moe)",
    )
    p.add_argument("--runs", default="runs", help="study runs directory")
    for f in fields(Caps):
        p.add_argument(
            "--" + f.name.replace("_", "-"), type=int, default=None, help=f"cap: {f.name} (default {f.default})"
        )
    return p


def caps_from(ns) -> Caps:
    given = {f.name: getattr(ns, f.name) for f in fields(Caps) if getattr(ns, f.name, None) is not None}
    return Caps(**given)


def workbench_from_argv(argv: Sequence[str] | None = None) -> Workbench:
    """The process-wide Workbench for these options (all sessions share it, and its model locks)."""
    ns, _ = parser().parse_known_args(argv)
    return shared(ns.model, moe_models=tuple(ns.moe or ("tiny-moe",)), runs=ns.runs, caps=caps_from(ns))


# --- exposure: loopback, or authentication ------------------------------------------------------------------

LOOPBACK_NAMES = ("localhost", "ip6-localhost", "ip6-loopback")


def is_loopback(host: str | None) -> bool:
    """``127.0.0.0/8``, ``::1`` or ``localhost``; ``""``, ``0.0.0.0`` and ``::`` (every interface) are not."""
    if not host:
        return False
    host = host.strip("[]").split("%")[0]
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    return ip.is_loopback or (ip.version == 6 and ip.ipv4_mapped is not None and ip.ipv4_mapped.is_loopback)


def _servers() -> list:
    """The Tornado HTTP servers of this process (Bokeh/Panel's, once they listen)."""
    from tornado.httpserver import HTTPServer

    return [o for o in gc.get_objects() if isinstance(o, HTTPServer)]


def listening_addresses() -> list[str] | None:
    """Hosts this process's web servers listen on (``None`` before any listens, e.g. during ``--warm``);
    a Unix socket counts as ``"unix"``."""
    out = []
    for server in _servers():
        for sock in list(getattr(server, "_sockets", {}).values()):
            try:
                name = sock.getsockname()
            except OSError:
                continue
            out.append(name[0] if isinstance(name, tuple) else "unix")
    return out or None


def _argv_option(argv: Sequence[str], name: str) -> str | None:
    """``--name VALUE`` / ``--name=VALUE`` among the server's own options (before ``--args``)."""
    argv = list(argv)
    if "--args" in argv:
        argv = argv[: argv.index("--args")]
    for i, a in enumerate(argv):
        if a == name and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


def _auth_configured() -> bool:
    """Authentication is on: the running server's auth provider, else Panel's config, the command line
    (``--basic-auth``, ``--oauth-provider``, ``--auth-module``) or Panel's environment variables."""
    from bokeh.server.auth_provider import NullAuth

    apps = [getattr(s, "request_callback", None) for s in _servers()]
    providers = [getattr(a, "auth_provider", None) for a in apps if a is not None]
    if providers:
        return all(p is not None and not isinstance(p, NullAuth) for p in providers)
    try:
        import panel as pn

        if pn.state.user or pn.config.oauth_provider or getattr(pn.config, "_basic_auth", None):
            return True
    except Exception:  # noqa: BLE001 - no Panel state yet
        pass
    argv = getattr(sys, "orig_argv", sys.argv)
    return bool(any(_argv_option(argv, o) for o in ("--basic-auth", "--oauth-provider", "--auth-module"))
                or os.environ.get("PANEL_BASIC_AUTH") or os.environ.get("PANEL_OAUTH_PROVIDER"))  # fmt: skip


def exposure_problem() -> str | None:
    """Why this process must not serve the dashboard (listening beyond loopback without authentication),
    or ``None``. Checks the sockets the server really listens on; before it listens (``panel serve
    --warm``), the ``--address`` / ``--unix-socket`` of its command line (no ``--address``: every interface)."""
    hosts = listening_addresses()
    if hosts is None:
        argv = getattr(sys, "orig_argv", sys.argv)
        if _argv_option(argv, "--unix-socket"):
            hosts = ["unix"]
        else:
            hosts = [_argv_option(argv, "--address") or "0.0.0.0"]
    exposed = sorted({h for h in hosts if h != "unix" and not is_loopback(h)})
    if not exposed or _auth_configured():
        return None
    where = ", ".join("every interface" if h in ("0.0.0.0", "::", "") else h for h in exposed)
    return (f"refusing to serve the workbench dashboard: the server listens on {where} without authentication, "
            "so anyone who can reach this machine could run the models and read the runs. Restart it on loopback "
            "(`panel serve apps/dashboard.py --address 127.0.0.1 ...` or `workbench serve`), or add authentication "
            "(`--basic-auth ... --cookie-secret ...` or `--oauth-provider ...`; see apps/README.md).")  # fmt: skip


def refusal_page(problem: str):
    """What every visitor sees instead of the dashboard when :func:`exposure_problem` says no."""
    import panel as pn

    from .common import md_escape

    return pn.Column(pn.pane.Alert(md_escape(problem), alert_type="danger", css_classes=["wb-refused"]), sizing_mode="stretch_width")


_ORIGIN_PATCHED = False


def require_websocket_origin() -> None:
    """Refuse websocket handshakes that carry no ``Origin`` header (403). Browsers always send one, and
    Bokeh checks it against the allowed origins; a handshake without it comes from a script, which would
    otherwise skip that check. (A script can still forge an allowed Origin: authentication is what
    keeps non-browser clients out.) Idempotent; applies to every Panel server in the process."""
    global _ORIGIN_PATCHED
    if _ORIGIN_PATCHED:
        return
    from panel.io.server import WSHandler

    original = WSHandler.prepare

    async def prepare(self):
        headers = self.request.headers
        if not (headers.get("Origin") or headers.get("Sec-Websocket-Origin")):
            log.warning("refusing a websocket connection to %s without an Origin header", self.request.path)
            self.set_status(403)
            self.finish("websocket connections need an Origin header")
            return
        await original(self)

    WSHandler.prepare = prepare
    _ORIGIN_PATCHED = True


# --- DNS rebinding: the Host header must name this server ------------------------------------------------------


def _host_name(host: str | None) -> str | None:
    """The name in a ``Host`` header (``name:port``, ``[::1]:port``), lower-case, without a trailing dot."""
    if not host:
        return None
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].split("]", 1)[0] or None
    if host.count(":") == 1:
        host = host.split(":", 1)[0]
    return host.rstrip(".") or None


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name.split("%")[0])
    except ValueError:
        return False
    return True


def public_names(app) -> set[str]:
    """Names the operator gave the server besides loopback: the hosts of its allowed websocket origins
    (``--allow-websocket-origin``; ``workbench serve`` adds its ``--address``)."""
    names = {_host_name(o) for o in getattr(app, "websocket_origins", ()) or ()}
    return {n for n in names if n and n not in ("0.0.0.0", "::", "*")}


def host_problem(host: str | None, app=None) -> str | None:
    """Why a request with this ``Host`` header must be refused, or ``None``. A web page can make a browser send
    requests to this server under the page's own name (DNS rebinding: ``evil.example`` resolves to 127.0.0.1);
    such a request carries ``Host: evil.example`` — and ``Origin`` equal to it, so Bokeh's origin check (which
    tornado skips when Origin equals Host) does not stop it. As Jupyter does: loopback names (``localhost``,
    ``127.0.0.0/8``, ``::1``) are always accepted, and so are the names the operator configured
    (:func:`public_names`: a proxy's public name, which an attacker's page cannot take); with authentication on,
    also IP addresses (a rebinding page always has a name); nothing else. ``app``: the Bokeh/Tornado application
    (default: this process's)."""
    from bokeh.server.auth_provider import NullAuth

    name = _host_name(host)
    if name is None:
        return "the request has no Host header"
    if is_loopback(name):
        return None
    apps = [app] if app is not None else [getattr(s, "request_callback", None) for s in _servers()]
    apps = [a for a in apps if a is not None]
    if any(name in public_names(a) for a in apps):
        return None
    auth = bool(apps) and all(not isinstance(getattr(a, "auth_provider", None), (NullAuth, type(None))) for a in apps)
    if auth and _is_ip(name):
        return None
    return (f"Host {name!r} is neither a loopback name (localhost, 127.0.0.1, ::1) nor one this server was given "
            f"(--allow-websocket-origin={name}:PORT): a page of another site may be driving your browser here (DNS rebinding)")  # fmt: skip


_HOST_PATCHED = False


def require_known_host() -> None:
    """Refuse (403) every HTTP request and websocket handshake whose ``Host`` header :func:`host_problem` rejects,
    in every Bokeh server of this process (``workbench serve`` and ``panel serve apps/dashboard.py``). Idempotent.
    Under ``panel serve`` this runs when the app script first runs, i.e. inside the first page request: the app
    checks that request itself (:func:`session_host_problem`)."""
    global _HOST_PATCHED
    if _HOST_PATCHED:
        return
    from bokeh.server.tornado import BokehTornado
    from tornado.web import ErrorHandler

    original = BokehTornado.find_handler

    def find_handler(self, request, **kwargs):
        problem = host_problem(request.headers.get("Host"), self)
        if problem:
            log.warning("refused %s %s: %s", request.method, request.path, problem)
            return self.get_handler_delegate(request, ErrorHandler, {"status_code": 403})
        return original(self, request, **kwargs)

    BokehTornado.find_handler = find_handler
    _HOST_PATCHED = True


def session_host_problem() -> str | None:
    """:func:`host_problem` for the request that opened the current Panel session (``None`` outside a server)."""
    import panel as pn

    request = getattr(getattr(pn.state.curdoc, "session_context", None), "request", None)
    if request is None:
        return None
    return host_problem(request.headers.get("Host"))


def check_address(address: str, port: int, *, auth: bool) -> None:
    """Refuse, before anything loads: a non-loopback ``address`` without ``auth``; an address that does not
    resolve or is not this machine's; a ``port`` already in use."""
    import socket

    if not is_loopback(address) and not auth:
        raise DashboardError(f"refusing to serve on {address or 'every interface'} without authentication: anyone who "
                             "can reach it could run the models. Use the default --address 127.0.0.1, or add "
                             "--basic-auth PASSWORD --cookie-secret SECRET (or --oauth-provider ...)")  # fmt: skip
    try:
        infos = socket.getaddrinfo(address or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as e:
        raise DashboardError(f"cannot serve on address {address!r}: it does not resolve ({e})") from None
    family, kind, proto, _, sockaddr = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Tornado does: a port in TIME_WAIT is free
        try:
            sock.bind(sockaddr)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise DashboardError(f"cannot serve on {address}:{port}: the port is already in use; choose another "
                                     "--port (or stop the server using it)") from None  # fmt: skip
            raise DashboardError(f"cannot serve on {address}:{port} ({e.strerror or e}); is {address!r} an address of "
                                 "this machine?") from None  # fmt: skip


def serve(
    address: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    *,
    model=None,
    moe_models: Sequence[str] = ("tiny-moe",),
    runs: str | Path = "runs",
    caps: Caps | None = None,
    preload: bool = True,
    show: bool = False,
    allow_websocket_origin: Sequence[str] | None = None,
    basic_auth: str | None = None,
    cookie_secret: str | None = None,
    oauth_provider: str | None = None,
    oauth_key: str | None = None,
    oauth_secret: str | None = None,
    oauth_redirect_uri: str | None = None,
    oauth_encryption_key: str | None = None,
    start: bool = True,
    **panel_kwargs,
):
    """Serve the dashboard at ``http://{address}:{port}/`` with a ``/liveness`` endpoint (``panel serve
    apps/dashboard.py`` serves it at ``/dashboard`` instead).

    ``preload``: load the main model before the first page (the first session then opens at once).
    Returns the Bokeh/Tornado server (``start=False``: not started, for embedding)."""
    import panel as pn

    from .app import build

    check_address(address, port, auth=bool(basic_auth or oauth_provider))
    require_websocket_origin()
    require_known_host()
    wb = shared(model, moe_models=tuple(moe_models), runs=runs, caps=caps)
    if preload:
        wb.model()
    origins = list(allow_websocket_origin or [])
    if not origins:
        origins = [f"{address}:{port}"] + ([f"localhost:{port}"] if address in ("127.0.0.1", "localhost") else [])
    auth = {k: v for k, v in dict(basic_auth=basic_auth, cookie_secret=cookie_secret, oauth_provider=oauth_provider,
                                  oauth_key=oauth_key, oauth_secret=oauth_secret, oauth_redirect_uri=oauth_redirect_uri,
                                  oauth_encryption_key=oauth_encryption_key).items() if v is not None}  # fmt: skip
    log.info(
        "workbench dashboard on http://%s:%s/ (auth: %s)",
        address,
        port,
        "basic" if basic_auth else oauth_provider or "none",
    )
    factory = lambda: build(wb)  # noqa: E731 — one template per session over the shared Workbench
    panel_kwargs.setdefault("websocket_max_message_size", MAX_MESSAGE_BYTES)
    server = pn.serve({"/": factory}, address=address, port=port, websocket_origin=origins, show=show, liveness=True,
                      title="workbench dashboard", start=False, **auth, **panel_kwargs)  # fmt: skip
    if start:
        server.start()
        server.io_loop.start()
    return server
