"""``python -m accelbn``: the command line of :mod:`accelbn._cli`."""

import sys

from accelbn._cli import main

if __name__ == "__main__":
    sys.exit(main())
