"""``python -m longctx.eval``: the evaluation CLI, also the entry point for torchrun / accelerate launch."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
