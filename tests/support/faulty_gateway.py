"""``python -m tests.support.faulty_gateway run -c proxy.toml``: the real gateway with one
request-path addon made to raise (chosen by ``TEEGATE_FAULT``), to prove it fails closed."""

from __future__ import annotations

import os
import sys

from addons import gate, upstream


def _boom(*_args, **_kwargs):
    raise RuntimeError("injected fault")


TARGETS = {
    "gate": (gate.Gate, "_lookup"),
    "upstream": (upstream.UpstreamRewrite, "_pin"),
}

if __name__ == "__main__":
    cls, attr = TARGETS[os.environ["TEEGATE_FAULT"]]
    assert hasattr(cls, attr), f"{cls.__name__}.{attr} is gone: update the fault injection"
    setattr(cls, attr, _boom)
    from teegate.cli import main

    sys.exit(main())
