"""`panel serve apps/dashboard.py` entry of the workbench dashboard (the logic lives in workbench.dashboard).

    panel serve apps/dashboard.py --address 127.0.0.1 --port 5006 --liveness \
        [--args --model SOURCE --moe tiny-moe --runs runs --max-scan-tests 24]

The options after --args are those of `workbench serve` (see apps/README.md); all sessions of the
server share one workbench: the loaded models and one lock per model.
"""

import sys

from workbench.dashboard.app import build
from workbench.dashboard.serve import workbench_from_argv

build(workbench_from_argv(sys.argv[1:])).servable(title="workbench dashboard")
