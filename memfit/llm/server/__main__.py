"""`python -m memfit.llm.server [options]` is `memfit serve [options]`."""
import sys

from memfit.llm.cli.serve import main

sys.exit(main())
