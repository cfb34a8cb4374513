"""`python -m genalign.app [--port N] [--model PATH --lora PATH ...]`: the same as `genalign demo`."""

import sys

from .demo import main

sys.exit(main())
