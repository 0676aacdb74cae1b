"""AlignQ short form with ADMM correlation preservation on (the experiment follows from the flags)."""
from alignq.engine import main

if __name__ == "__main__":
    main(admm=True)
