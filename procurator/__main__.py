"""``python -m procurator``: the same as the ``procurator`` command."""

import sys

from procurator.cli import main

if __name__ == "__main__":
    sys.exit(main())
