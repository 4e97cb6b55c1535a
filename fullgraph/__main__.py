"""`python -m fullgraph ...`: the `fullgraph` command."""
import sys

from fullgraph.entrypoints.cli import main

sys.exit(main())
