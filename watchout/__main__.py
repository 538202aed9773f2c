"""`python -m watchout`: the same entry point as the `watchout` console script."""
from watchout.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
