"""`python -m memfit.llm.server [options]` is `memfit serve [options]`."""
import sys

from memfit.llm.server.cli import main

sys.exit(main())
