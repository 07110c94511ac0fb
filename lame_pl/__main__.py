"""`python -m lame_pl`: the `lightning` command line with LaME's models and data modules."""

from lame_pl.cli import main

if __name__ == "__main__":
    main()
