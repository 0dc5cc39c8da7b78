"""``python -m sandbox``: run the simulated upstream (see ``--help``)."""

import sys

from sandbox.server import main

sys.exit(main())
