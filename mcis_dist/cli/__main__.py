"""``python -m mcis_dist.cli``: the ``mcis`` command."""

import sys

from mcis_dist.cli import main

sys.exit(main())
