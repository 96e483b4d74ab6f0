"""`python -m diffit_cli ...` (so `accelerate launch -m diffit_cli train ...` works)."""

from diffit_cli.app import main

if __name__ == "__main__":
    main()
