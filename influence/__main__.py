"""``python -m influence``: the command line of :mod:`influence.cli`."""

from influence.cli import main

raise SystemExit(main())
