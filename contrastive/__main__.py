"""``python -m contrastive ...`` (and ``torchrun -m contrastive train ...``)."""

import sys

from .cli import main

sys.exit(main())
