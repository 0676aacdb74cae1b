"""The repository's later name for main_cosine_CBNS.py (same flags, same behaviour)."""
from common.errors import cli
from fdda.main_cosine_CBNS import main

if __name__ == "__main__":
    cli(main)()
