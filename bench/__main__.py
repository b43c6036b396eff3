"""`python -m bench [--quick] [--only engine,web,...]`."""

import sys

from bench.run import main

sys.exit(main())
