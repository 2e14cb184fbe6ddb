"""``python -m tierbox.tiers.vm``: see :mod:`tierbox.tiers.vm.entry`."""

import sys

from tierbox.tiers.vm.entry import main

sys.exit(main())
