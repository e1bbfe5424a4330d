"""``python -m cachesaver_dist``: the ``cachesaver-dist`` command."""

from .cli import main

raise SystemExit(main())
