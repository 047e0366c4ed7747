"""``python -m albor.report RUN_DIR``: the same as ``albor report RUN_DIR``."""

import sys

from albor.report.command import main

sys.exit(main())
