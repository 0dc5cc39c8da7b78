"""Run the Python clients' cells of one mode in this process and write their outcomes as JSON.

``python -m tests.compat.py_runner CONFIG.json OUT.json``: CONFIG holds ``mode``, ``api_base``,
``api_key``, ``model`` and ``cells`` (``client.feature.mode`` ids). The tests start one such
process per mode with the environment a user's app would have (in egress mode ``HTTPS_PROXY``
and the CA variables), so no proxy setting leaks into the test process, and the frameworks are
imported once per mode. Every cell runs whatever the others did; a failure is recorded as
``{"ok": false, "error": ...}`` with the client's exception type and message.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path

from tests.compat.py_cells import Target, load


def run(config: dict) -> dict[str, dict]:
    results: dict[str, dict] = {}
    for cid in config["cells"]:
        client, feature, _mode = cid.split(".")
        target = Target(config["api_base"], config["api_key"], config["model"], f"compat {cid}")
        started = time.monotonic()
        try:
            outcome = load()[(client, feature)](target)
            results[cid] = {"ok": True, **outcome.as_json()}
        except Exception as e:  # noqa: BLE001 - every failure is a recorded outcome
            results[cid] = {
                "ok": False,
                "error": f"{type(e).__name__}: {e}",
                "traceback": traceback.format_exc()[-2000:],
            }
        results[cid]["seconds"] = round(time.monotonic() - started, 3)
    return results


def main(argv: list[str]) -> int:
    config = json.loads(Path(argv[0]).read_text())
    Path(argv[1]).write_text(json.dumps(run(config), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
