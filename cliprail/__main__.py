"""``python -m cliprail`` (what torchrun launches) is the ``cliprail`` command."""

from cliprail.cli import main

raise SystemExit(main())
