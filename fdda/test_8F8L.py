"""Evaluate an F8L8 student (first layer, last activation and every Linear at 8 bits); flags as test.py."""
from common.errors import cli
from fdda.test import main

if __name__ == "__main__":
    cli(main)(f8l8=True)
