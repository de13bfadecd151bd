"""Side-by-side benchmark of moe_sft vs torch and numpy; see moe_sft/bench.py (same as python -m moe_sft bench)."""
import sys

from moe_sft.bench import main

if __name__ == "__main__":
    sys.exit(main())
