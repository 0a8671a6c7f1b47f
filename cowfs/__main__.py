import sys

from cowfs.client import main

sys.exit(main())
