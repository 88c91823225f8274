"""`python -m padd ...` is the `padd` command."""

import sys

from padd.cli import main

sys.exit(main())
