from mmbalance.bench.cli import main

raise SystemExit(main())
