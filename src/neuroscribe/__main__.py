"""``python -m neuroscribe`` is the ``neuroscribe`` command."""

from neuroscribe.cli import main

raise SystemExit(main())
