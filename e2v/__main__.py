import sys

from e2v.cli import main

sys.exit(main())
