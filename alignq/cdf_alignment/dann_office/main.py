"""AlignQ CDF alignment, dann_office (the original's cdf_alignment/dann_office/main.py); flags: alignq/options.py."""
from alignq.engine import main

if __name__ == "__main__":
    main("dann_office")
