"""``python -m weathermodel`` is the ``weathermodel`` command."""
import sys

from weathermodel.cli import main

sys.exit(main())
