"""``python -m resolver``: the same as the ``resolver`` command."""

from .cli.main import main

raise SystemExit(main())
