"""``python -m atp_repro``: same as the ``atp-repro`` command."""

from atp_repro.cli import main

raise SystemExit(main())
