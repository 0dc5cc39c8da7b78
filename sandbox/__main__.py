"""``python -m teegate.sandbox``: run the simulated upstream (see ``--help``)."""

import sys

from teegate.sandbox.server import main

sys.exit(main())
