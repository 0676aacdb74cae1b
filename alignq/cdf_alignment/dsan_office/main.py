"""AlignQ CDF alignment, dsan_office (the original's cdf_alignment/dsan_office/main.py); flags: alignq/options.py."""
from alignq.engine import main

if __name__ == "__main__":
    main("dsan_office")
