"""One cold start, in a fresh process: import an implementation, make its first call, then a second.

    python -m benchmarks.coldstart IMPL JOB B,H,V T      # IMPL: a backend name, torch or jax

Prints one JSON line: import_s (importing the implementation and what it needs),
first_call_s (the first call: compilation, cache loading, workspace), second_call_s (the steady
state, for comparison). ``harness.cold_start`` runs it with a chosen NUMBA_CACHE_DIR: empty,
warm (filled by the same call before), and filled by ``rlhf-ref warmup``.
"""

from __future__ import annotations

import json
import os
import sys
import time


def main(argv):
    impl, job, case, T = argv[0], argv[1], tuple(int(x) for x in argv[2].split(",")), int(argv[3])
    t_start = time.perf_counter()
    import numpy as np

    from .harness import make_case
    from rlhf_ref.tokenizer import EOS
    B, H, V = case
    p64, prompt, pl, u, reward = make_case(B, H, V, T)
    p32 = {k: v.astype(np.float32) for k, v in p64.items()}
    tokens = np.ones((B, T), np.int64)
    mask = np.ones((B, T))
    ref_logp = np.zeros((B, T))
    t0 = time.perf_counter()
    if impl == "torch":
        import torch
        from . import torch_impl
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))   # as the benchmark run
        m = torch_impl.Policy(p32)
        tu, tt = torch.from_numpy(u.astype(np.float32)), torch.from_numpy(tokens)
        tr, tw = torch.from_numpy(ref_logp.astype(np.float32)), torch.from_numpy(reward.astype(np.float32))
        call = ((lambda: torch_impl.rollout_cell(m, tu)) if job == "rollout"
                else (lambda: torch_impl.reinforce_step(m, tt, tr, tw)))
    elif impl == "jax":
        import jax
        from . import jax_impl as J
        jp = J.to_device(p32)
        if job == "rollout":
            ju = jax.device_put(u.astype(np.float32))
            call = lambda: jax.block_until_ready(J.rollout(jp, ju, unroll=1))            # noqa: E731
        else:
            a = (jax.device_put(tokens.astype(np.int32)), jax.device_put(ref_logp.astype(np.float32)),
                 jax.device_put(reward.astype(np.float32)))
            call = lambda: jax.block_until_ready(J.train_step(jp, *a, unroll=1))         # noqa: E731
    else:
        from rlhf_ref import backends
        b = backends.get(impl)
        call = ((lambda: b.rollout(p32, prompt, pl, u, eos_id=EOS)) if job == "rollout"
                else (lambda: b.reinforce_loss_and_grad(p32, tokens, mask, pl, reward, ref_logp=ref_logp)))
    t1 = time.perf_counter()
    call()
    t2 = time.perf_counter()
    call()
    t3 = time.perf_counter()
    print(json.dumps({"setup_s": t0 - t_start, "import_s": t1 - t0, "first_call_s": t2 - t1,
                      "second_call_s": t3 - t2}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
