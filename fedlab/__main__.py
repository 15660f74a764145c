"""``python -m fedlab`` is the ``fedlab`` command."""

import sys

from fedlab.cli import main

sys.exit(main())
