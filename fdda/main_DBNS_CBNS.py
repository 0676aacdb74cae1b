"""The repository's later name for main_cosine_CBNS.py (same flags, same behaviour)."""
import os
import sys

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common.errors import cli  # noqa: E402
from fdda.main_cosine_CBNS import main  # noqa: E402

if __name__ == "__main__":
    cli(main)()
