"""Serving the dashboard: :func:`serve` (what ``workbench serve`` calls) and the configuration that
``panel serve apps/dashboard.py --args ...`` reads.

Binds 127.0.0.1 unless told otherwise; ``/liveness`` answers when the server is up. Authentication is
Panel's own: ``basic_auth`` (a password, or a JSON file of user → password) with a ``cookie_secret``,
or ``oauth_provider`` + ``oauth_key`` / ``oauth_secret`` / ``oauth_redirect_uri`` / ``cookie_secret`` /
``oauth_encryption_key`` (see apps/README.md).
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import fields
from pathlib import Path
from typing import Sequence

from .state import Caps, Workbench, shared

log = logging.getLogger("workbench.dashboard")
DEFAULT_PORT = 5006


def parser() -> argparse.ArgumentParser:
    """Options of ``panel serve apps/dashboard.py --args ...`` (the same names as ``workbench serve``)."""
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
    """Serve the dashboard at ``http://{address}:{port}/`` (also ``/dashboard``) with a ``/liveness`` endpoint.

    ``preload``: load the main model before the first page (the first session then opens at once).
    Returns the Bokeh/Tornado server (``start=False``: not started, for embedding)."""
    import panel as pn

    from .app import build

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
    server = pn.serve({"/": factory}, address=address, port=port, websocket_origin=origins, show=show, liveness=True,
                      title="workbench dashboard", start=False, **auth, **panel_kwargs)  # fmt: skip
    if start:
        server.start()
        server.io_loop.start()
    return server
