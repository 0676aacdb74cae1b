"""AlignQ CDF alignment + ADMM correlation preservation, dsan_office (the original's cdf_alignment_admm/dsan_office/main.py)."""
from alignq.engine import main

if __name__ == "__main__":
    main("dsan_office", admm=True)
