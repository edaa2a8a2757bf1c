"""``python -m scaletrain.cli``: the same as the ``scaletrain`` command (launchers use it)."""

import sys

from scaletrain.cli import main

sys.exit(main())
