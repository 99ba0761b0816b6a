"""`python -m oitools.stream`: the live stream client (oitools.stream.client)."""

import sys

from oitools.stream.client import main

if __name__ == "__main__":
    sys.exit(main())
