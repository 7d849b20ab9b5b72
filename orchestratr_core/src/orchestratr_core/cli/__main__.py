"""``python -m orchestratr_core.cli``: the ``orchestratr`` command."""

from __future__ import annotations

import sys

from orchestratr_core.cli import main

sys.exit(main())
