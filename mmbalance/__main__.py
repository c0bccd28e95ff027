"""`python -m mmbalance` is the `mmbalance` command."""

from mmbalance.bench.cli import main

raise SystemExit(main())
