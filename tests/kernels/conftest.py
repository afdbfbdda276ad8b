"""Make this folder's helper modules (kernel_testutil, kernel_tiny) importable under importlib mode."""

import sys
from pathlib import Path

_here = str(Path(__file__).parent)
if _here not in sys.path:
    sys.path.insert(0, _here)
