import sys

from testing.mirror.cli import main

sys.exit(main())
