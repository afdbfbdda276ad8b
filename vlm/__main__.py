"""``python -m vlm`` == ``vlm`` (used by ``accelerate launch -m vlm``)."""

import sys

from vlm.cli.main import main

sys.exit(main())
