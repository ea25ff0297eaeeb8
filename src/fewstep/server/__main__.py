"""`python -m fewstep.server ...`: the same as `fewstep serve ...`."""

import sys

from .cli import main

sys.exit(main())
