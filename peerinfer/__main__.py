"""``python3 -m peerinfer bootstrap --port P`` and ``python3 -m peerinfer peers --bootstrap host:port``."""

import sys

from peerinfer.network.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
