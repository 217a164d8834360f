"""python -m opsft.cli ... (same as the `opsft` command)."""

import sys

from opsft.cli import main

sys.exit(main())
