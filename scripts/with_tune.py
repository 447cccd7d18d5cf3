"""Runs a script with the Triton layers' tile table changed (labkit.kernels.triton_common.TUNE),
so that one call can time a diagnostic under two tile settings (diagnostic helper).

    python3 scripts/with_tune.py block_m_max=16 [key=value ...] -- scripts/batch_eagle_costs.py /tmp/eagle 2,4 5
"""

import runpy
import sys
from pathlib import Path

from labkit.kernels.triton_common import TUNE

split = sys.argv.index("--")
for item in sys.argv[1:split]:
    key, value = item.split("=")
    if key not in TUNE:
        sys.exit(f"with_tune: unknown TUNE key {key!r} (known: {', '.join(TUNE)})")
    TUNE[key] = type(TUNE[key])(int(value) if isinstance(TUNE[key], bool) else value)
print("TUNE:", {k: TUNE[k] for k in (item.split("=")[0] for item in sys.argv[1:split])})
script = sys.argv[split + 1]
sys.argv = sys.argv[split + 1 :]
sys.path.insert(0, str(Path(script).resolve().parent))
runpy.run_path(script, run_name="__main__")
