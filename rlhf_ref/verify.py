"""``rlhf_ref.verify`` is ``rlhf_ref.golden.verify`` (the package layout of the golden vectors and
the verifier: rlhf_ref/golden/). Kept so that existing imports and ``python -m rlhf_ref.verify`` work."""

import sys

from .golden import verify as _impl

if __name__ == "__main__":       # pragma: no cover
    import argparse
    ap = _impl.add_arguments(argparse.ArgumentParser(prog="python -m rlhf_ref.verify"))
    sys.exit(_impl.main(ap.parse_args()))
else:
    sys.modules[__name__] = _impl
