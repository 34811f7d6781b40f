"""`python -m vmig ...`: the same as the `vmig` command."""

from vmig.cli import main

if __name__ == "__main__":
    main()
