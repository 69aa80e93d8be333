"""``python -m shipper`` entry point."""

from shipper.cli import main

raise SystemExit(main())
