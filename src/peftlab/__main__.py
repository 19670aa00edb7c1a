"""``python -m peftlab ...`` and ``torchrun --nproc_per_node=2 -m peftlab train ...``."""

import sys

from peftlab.cli import main

sys.exit(main())
