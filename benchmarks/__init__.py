"""rlhf_ref benchmarks: rollouts and training steps, every backend beside PyTorch CPU.

Run ``python -m benchmarks`` (see ``benchmarks/README.md``). Never collected by the test run.
"""
