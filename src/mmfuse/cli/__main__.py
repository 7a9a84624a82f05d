"""python -m mmfuse.cli: the same as the ``mmfuse`` command."""

import sys

from mmfuse.cli import main

sys.exit(main())
