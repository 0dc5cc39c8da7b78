import sys

from teegate.cli import main

sys.exit(main())
