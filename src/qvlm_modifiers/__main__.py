"""``python -m qvlm_modifiers`` runs the ``qvlm`` command line (same as the console script)."""

import sys

from qvlm_modifiers.cli import main

if __name__ == "__main__":
    sys.exit(main())
