"""python -m bids_qsmnet → the BIDS-App command line."""

import sys

from .cli.run import main

sys.exit(main())
