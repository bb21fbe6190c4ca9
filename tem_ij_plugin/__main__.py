"""``python -m tem_ij_plugin`` is the same as ``tem-ij``."""

import sys

from .cli import main

sys.exit(main())
