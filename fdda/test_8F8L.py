"""Evaluate an F8L8 student (first layer, last activation and every Linear at 8 bits); flags as test.py."""
import os
import sys

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common.errors import cli  # noqa: E402
from fdda.test import main  # noqa: E402

if __name__ == "__main__":
    cli(main)(f8l8=True)
