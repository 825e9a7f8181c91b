"""`python -m train.scaling report|ladder ...`: see train.scaling.cli."""

import sys

from train.scaling.cli import main

if __name__ == "__main__":
    sys.exit(main())
