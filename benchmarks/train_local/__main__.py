"""`python -m benchmarks.train_local`: see benchmarks/train_local/cli.py for the options."""
import sys

from benchmarks.train_local.cli import main

sys.exit(main())
