"""``python -m ldjax COMMAND ...`` is ``ldjax COMMAND ...``."""

import sys

from ldjax.experiments.cli import main

sys.exit(main())
