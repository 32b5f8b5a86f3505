import sys

from baryir_plugin.cli import main

sys.exit(main())
