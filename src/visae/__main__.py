"""`python -m visae ...`, the same as the `visae` command."""

from visae.cli import main

raise SystemExit(main())
