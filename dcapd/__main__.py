"""``python -m dcapd`` does what the ``dcapd`` console script does."""

from .cli import main

raise SystemExit(main())
