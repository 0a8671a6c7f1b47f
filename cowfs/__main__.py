import sys

from cowfs.cli import main

sys.exit(main())
