"""python -m launcher: see launcher.cli."""

import sys

from launcher.cli import main

sys.exit(main())
