"""python -m rewards {train,evaluate} ...: the reward models' command line (rewards.cli)."""

import sys

from rewards.cli import main

sys.exit(main())
