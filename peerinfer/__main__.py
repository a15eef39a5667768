"""``python3 -m peerinfer bootstrap|peers|gateway ...`` (see ``--help``)."""

import sys

from peerinfer.network.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
