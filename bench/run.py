"""Run the end-to-end benchmark from a checkout: ``python bench/run.py --size cpu``.

The same as ``python -m vaultkern bench ...`` (see vaultkern/benchmark/ and bench/NOTES.md).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vaultkern.benchmark import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
