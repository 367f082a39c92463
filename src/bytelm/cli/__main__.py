"""`python -m bytelm.cli ...` (and `torchrun ... -m bytelm.cli train ...`)."""

import sys

from . import main

sys.exit(main())
