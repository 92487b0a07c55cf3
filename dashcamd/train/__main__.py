"""`python -m dashcamd.train`."""

import sys

from .cli import main

sys.exit(main())
