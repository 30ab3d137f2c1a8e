"""``python -m rlhf_ref ...``: the same as the ``rlhf-ref`` command (rlhf_ref.cli)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
