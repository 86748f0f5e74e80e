import sys

from ambientctl.main import main

sys.exit(main())
