"""`python -m xft.configs NAME`: print the path of a shipped accelerate config (default: ddp)."""

import sys

from xft.configs import accelerate_config

print(accelerate_config(sys.argv[1] if len(sys.argv) > 1 else "ddp"))
