"""``python -m tdpsim``: the ``tdpsim`` command."""

import sys

from .cli import main

sys.exit(main())
