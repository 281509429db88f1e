"""`panel serve apps/dashboard.py` entry of the workbench dashboard (the logic lives in workbench.views.dashboard).

    panel serve apps/dashboard.py --address 127.0.0.1 --port 5006 --liveness \
        [--args --model SOURCE --moe tiny-moe --runs runs --max-scan-tests 24]

The options after --args: --model, --moe (repeatable) and --runs as in `workbench serve`, and every cap of
workbench.views.dashboard.validation.Caps as --max-... (see apps/README.md); all sessions of the server share one
workbench: the loaded models and one lock per model.

Served beyond loopback (no --address, or a public one) without --basic-auth/--oauth-provider, every
visitor gets a refusal instead of the dashboard, and the model is never loaded; websocket handshakes
without an Origin header are refused, and so is any request whose Host header is not a loopback name (a page
of another site rebinding its name to 127.0.0.1), or with authentication, a name the server was given.
"""

import logging
import sys

from workbench.views.dashboard.serve import (exposure_problem, refusal_page, require_known_host, require_websocket_origin,
                                       session_host_problem, workbench_from_argv)

require_websocket_origin()
require_known_host()  # later requests; this one (the first may come before the patch) is checked just below
problem = session_host_problem() or exposure_problem()
if problem:
    logging.getLogger("workbench.views.dashboard").error(problem)
    refusal_page(problem).servable(title="workbench dashboard: refused")
else:
    from workbench.views.dashboard.app import build

    build(workbench_from_argv(sys.argv[1:])).servable(title="workbench dashboard")
