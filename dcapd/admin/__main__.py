"""``python -m dcapd.admin`` does what the ``dcapd-admin`` console script does."""

from .cli import main

raise SystemExit(main())
