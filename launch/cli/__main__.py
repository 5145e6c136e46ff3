"""`python -m launch.cli`: the same as `extrema-launch`."""

import sys

from launch.cli.app import main

sys.exit(main())
