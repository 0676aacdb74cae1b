"""FDDA training with F8L8: the first layer and the last activation at 8 bits, every Linear at 8 bits
(the original's main_DBNS_CBNS_8F8L.py). Same flags as main_cosine_CBNS.py."""
import os
import sys

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common.errors import cli  # noqa: E402
from fdda.main_cosine_CBNS import main  # noqa: E402

if __name__ == "__main__":
    cli(main)(f8l8=True)
