"""A bare gateway master on a given port with teegate's ``SO_REUSEPORT`` listener patch, that
answers every request itself with its process id (``x-worker-pid``): two of them on one port
show whether the kernel spreads connections over both (tests/workers/test_listeners.py).

``python -m tests.support.reuseport_server PORT`` prints ``LISTENING`` once bound.
"""

from __future__ import annotations

import asyncio
import os
import sys

from mitmproxy import http, options

from teegate.listeners import share_port
from teegate.master import GatewayMaster


class AnswerWithPid:
    def request(self, flow: http.HTTPFlow) -> None:
        flow.response = http.Response.make(200, b"ok", {"x-worker-pid": str(os.getpid())})

    def running(self) -> None:
        print("LISTENING", flush=True)


async def main(port: int) -> None:
    share_port()
    master = GatewayMaster(options.Options())
    master.addons.add(AnswerWithPid())
    master.options.update(
        mode=[f"reverse:http://127.0.0.1:9@127.0.0.1:{port}"], connection_strategy="lazy"
    )
    await master.run()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
