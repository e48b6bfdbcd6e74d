"""``python -m worker.replica DIR --size S [--seed N]``: write a random-weight replica."""
from worker.replica.checkpoint import main

raise SystemExit(main())
