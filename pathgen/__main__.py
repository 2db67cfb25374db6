"""`python -m pathgen ...`: the same as the `pathgen` command."""

import sys

from pathgen.cli import main

sys.exit(main())
