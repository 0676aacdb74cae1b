"""The repository's later name for main_cosine_CBNS_8F8L.py: FDDA training with F8L8 (first layer, last
activation and every Linear at 8 bits). Same flags as main_cosine_CBNS.py."""
from common.errors import cli
from fdda.main_cosine_CBNS import main

if __name__ == "__main__":
    cli(main)(f8l8=True)
