"""A bare gateway master on a given port with teegate's ``SO_REUSEPORT`` listener patch, that
answers every request itself with its process id (``x-worker-pid``): two of them on one port
show whether the kernel spreads connections over both (tests/workers/test_listeners.py).

``python -m tests.support.reuseport_server PORT`` prints ``LISTENING`` once bound;
``PORT --hold`` binds without accepting until a line arrives on stdin, then prints ``SERVING``
(a worker warming up, teegate/listeners.py ``hold``).
"""

from __future__ import annotations

import asyncio
import os
import sys

from mitmproxy import http, options

from teegate.listeners import serve_held, share_port
from teegate.master import GatewayMaster


class AnswerWithPid:
    def __init__(self, hold: bool) -> None:
        self.hold = hold

    def request(self, flow: http.HTTPFlow) -> None:
        flow.response = http.Response.make(200, b"ok", {"x-worker-pid": str(os.getpid())})

    async def running(self) -> None:
        print("LISTENING", flush=True)
        if self.hold:
            asyncio.get_running_loop().create_task(self._serve_on_stdin())

    async def _serve_on_stdin(self) -> None:
        await asyncio.to_thread(sys.stdin.readline)
        await serve_held()
        print("SERVING", flush=True)


async def main(port: int, hold: bool) -> None:
    share_port(hold=hold)
    master = GatewayMaster(options.Options())
    master.addons.add(AnswerWithPid(hold))
    master.options.update(
        mode=[f"reverse:http://127.0.0.1:9@127.0.0.1:{port}"], connection_strategy="lazy"
    )
    await master.run()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), "--hold" in sys.argv[2:]))
