"""Stream an answer from a peerinfer worker: ``python3 client.py "your question"``."""

import sys

from peerinfer.client.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
