import sys

from oimirror.cli import main

sys.exit(main())
