"""`python -m gpu_orthol1.bench`: the same as `gpu-orthol1 bench`."""

import sys

from .command import main

sys.exit(main())
