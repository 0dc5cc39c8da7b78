"""``python -m bench``: see :mod:`bench.harness` and docs/bench.md."""

import sys

from bench.harness import main

sys.exit(main())
