"""`python -m nanochat_cli ...`: the `nanochat` command."""

import sys

from .main import main

sys.exit(main())
