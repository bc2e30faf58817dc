"""``python -m vsa_nd demo``: see :mod:`vsa_nd.cli`."""

import sys

from .cli import main

sys.exit(main())
