"""The ``rlhf-ref`` command line (also ``python -m rlhf_ref``).

Subcommands come from the ``COMMANDS`` table: each names the module that implements it, which
has the two functions of every command, ``add_arguments(parser)`` (adds the subcommand's
arguments) and ``main(args) -> int`` (the exit status); a module with several commands
(rlhf_ref.pipeline.commands) has one object per command holding the two. Only the module of the
subcommand being run is imported, so ``rlhf-ref --help`` and ``rlhf-ref info`` never import the
demo, the pipeline, numba or torch (``info`` imports numba only when it probes the backends).

To add a subcommand, write those two functions in your module and add one line to ``COMMANDS``.

    rlhf-ref info        versions, BLAS, CPU, optional parts and the backend registry (rlhf_ref.info)
    rlhf-ref demo        the end-to-end RLHF demo (rlhf_ref.demo)
    rlhf-ref label       judge pairs (or rate samples) in the terminal (rlhf_ref.label)
    rlhf-ref warmup      fill Numba's on-disk cache with every kernel a job reaches (rlhf_ref.warmup)
"""

from __future__ import annotations

import argparse
import importlib
import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class Command:
    """One subcommand: ``add_arguments(parser)`` adds its arguments, ``main(args)`` returns the exit
    code; both are functions of ``module``, or of its attribute ``attr`` when the module has several
    commands."""

    name: str
    module: str
    help: str
    attr: str | None = None

    def load(self):
        """The object with ``add_arguments`` and ``main``: the module, or its attribute ``attr``."""
        mod = importlib.import_module(self.module)
        return mod if self.attr is None else getattr(mod, self.attr)


COMMANDS = (
    Command("info", "rlhf_ref.info", "versions, BLAS, CPU, optional parts and which backends are available (and why not)"),
    Command("demo", "rlhf_ref.demo", "the end-to-end RLHF demo: pretrain, preferences, reward model, REINFORCE, evaluate"),
    Command("label", "rlhf_ref.label", "judge pairs of samples (or rate samples) in the terminal, one key per judgement"),
    Command("sample", "rlhf_ref.pipeline.commands", "generate text from a policy checkpoint (or label candidates)", "sample"),
    Command("train-pretrain", "rlhf_ref.pipeline.commands", "pretrain the policy on a corpus (π_ref)", "train_pretrain"),
    Command("train-rm", "rlhf_ref.pipeline.commands", "train the reward model on a preference file", "train_rm"),
    Command("train-rl", "rlhf_ref.pipeline.commands", "REINFORCE fine-tuning against the reward model", "train_rl"),
    Command("vectors", "rlhf_ref.vectors", "write the golden vectors: versioned cases (.npz + manifest) any implementation can check itself on"),
    Command("verify", "rlhf_ref.verify", "compare another implementation's outputs with the golden vectors: first difference, where, why"),
    Command("warmup", "rlhf_ref.warmup", "compile the numba kernels of every job into Numba's on-disk cache, once per machine: first calls then only load them"),
)


# The commands that read files users name: each gets --max-file-mb (rlhf_ref.safe_read's limits).
FILE_COMMANDS = ("demo", "label", "sample", "train-pretrain", "train-rm", "train-rl")


def _add_file_limit(p):
    p.add_argument("--max-file-mb", type=float, default=None, metavar="MB",
                   help="largest file read, in MiB (default 2048; arrays of one checkpoint may declare twice "
                        "that); raise it for larger checkpoints or preference files")


def _command_in(argv):
    """The subcommand named on the command line (the first non-option word), or None."""
    for a in argv:
        if a == "--":
            return None
        if not a.startswith("-"):
            return a
    return None


def build_parser(argv=()):
    """The parser; only the subcommand named in ``argv`` (if any) has its module imported."""
    from . import __version__
    parser = argparse.ArgumentParser(
        prog="rlhf-ref", description="rlhf_ref: the reference implementation of RLHF for language models.",
        epilog="'rlhf-ref <command> --help' for a command's options.")
    parser.add_argument("--version", action="version", version=f"rlhf_ref {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="command", required=True)
    chosen = _command_in(argv)
    for cmd in COMMANDS:
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        p.set_defaults(_command=cmd)
        if cmd.name == chosen:
            try:
                impl = cmd.load()
            except ModuleNotFoundError as e:
                if e.name == cmd.module:
                    parser.exit(2, f"rlhf-ref: error: command {cmd.name!r} is not available in this build "
                                   f"({cmd.module} is missing)\n")
                raise
            impl.add_arguments(p)
            if cmd.name in FILE_COMMANDS:
                _add_file_limit(p)
    return parser


def main(argv=None) -> int:
    """Run ``rlhf-ref`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)
    cmd = args._command
    from . import safe_read
    try:
        safe_read.set_max_file_mb(getattr(args, "max_file_mb", None))
    except ValueError as e:
        sys.stderr.write(f"rlhf-ref {cmd.name}: error: {e}\n")
        return 2
    try:
        code = cmd.load().main(args)
    except safe_read.FileReadError as e:   # also CheckpointError, PreferenceFileError: '<file>[:<line>]: <what>'
        sys.stderr.write(f"rlhf-ref {cmd.name}: error: {e}\n")
        return 2
    return 0 if code is None else int(code)
