"""`python -m bench s1|s2|s3|all [--quick] ...`: the load scenarios (bench/scenarios/)."""

from __future__ import annotations

import sys

from bench.scenarios.runner import main

if __name__ == "__main__":
    sys.exit(main())
