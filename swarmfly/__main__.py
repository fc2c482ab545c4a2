import sys

from swarmfly.cli import main

sys.exit(main())
