"""FDDA training with F8L8: the first layer and the last activation at 8 bits, every Linear at 8 bits
(the original's main_DBNS_CBNS_8F8L.py). Same flags as main_cosine_CBNS.py."""
from common.errors import cli
from fdda.main_cosine_CBNS import main

if __name__ == "__main__":
    cli(main)(f8l8=True)
