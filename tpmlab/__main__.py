"""``python -m tpmlab``: the ``tpmlab`` command (setup calls it before the script is on PATH)."""

from tpmlab.cli import main

raise SystemExit(main())
