import sys

from labpipe.cli import main

sys.exit(main())
