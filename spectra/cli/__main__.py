"""`python -m spectra.cli`: the same as the `spectra` command."""

import sys

from spectra.cli import main

sys.exit(main())
