"""``python -m safegen_batch {run,report} ...``"""
from safegen_batch.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
