"""The ``cuda`` backend (Numba CUDA): rollouts and sequence log-probs on an NVIDIA GPU.

Implemented: ``rollout`` and ``sequence_logprobs`` (``_rollout_cuda.py``: one kernel runs the
whole sampling loop for all rows; see its docstring for the design). They validate with the
reference's own checks before any kernel runs and compute in the dtype of ``params``.

NOT implemented: ``reinforce_loss_and_grad``, ``sft_loss_and_grad``, ``reward_forward`` and
``bt_loss_and_grad`` raise ``NotImplementedError`` naming the function; nothing substitutes
silently. ``IMPLEMENTED`` lists what this backend does, so the registry must never pick
``cuda`` for training (``backend="auto"`` for a training job) — only for rollouts at large B.

Availability (``probe``): ``numba.cuda.is_available()``, which is true on a machine with an
NVIDIA GPU and driver, and under Numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``, set before
Python starts; slow, for tests only). Install: ``pip install rlhf_ref[cuda]``. Numba 0.68's
built-in CUDA target runs the simulator; on a real GPU it also needs the CUDA toolkit's NVVM and
libdevice (found through ``CUDA_HOME``, a system install or conda); NVIDIA's ``numba-cuda``
package (``numba-cuda[cu12]``) brings them as wheels and is picked up by the same
``from numba import cuda`` with no code change.
"""

from __future__ import annotations

from ..tokenizer import EOS

NAME = "cuda"
IMPLEMENTED = frozenset({"rollout", "sequence_logprobs"})

_NO_GPU = ("no CUDA GPU: numba.cuda.is_available() is False "
           "(set NUMBA_ENABLE_CUDASIM=1 to use the simulator)")


def probe():
    """None when the CUDA kernels can run here, else the reason they cannot."""
    try:
        import numba  # noqa: F401
    except ModuleNotFoundError:
        return "numba not installed"
    except Exception as e:       # numba refuses this NumPy, a broken install, ...
        return f"numba failed to import: {type(e).__name__}: {e}"
    try:
        from numba import cuda
        ok = bool(cuda.is_available())
    except Exception as e:       # driver problems
        return f"numba.cuda failed: {type(e).__name__}: {e}"
    return None if ok else _NO_GPU


def _kernels():
    why = probe()
    if why is not None:
        raise RuntimeError(f"the cuda backend is unavailable: {why}")
    from . import _rollout_cuda
    return _rollout_cuda


def rollout(params, prompt_tokens, prompt_len, u, alpha=1.0, eps=0.0, kind="boltzmann", eos_id=EOS,
            ref_params=None, values=False):
    """rlhf_ref.rollout.rollout on the GPU: same arguments, checks, keys and dtypes."""
    return _kernels().rollout(params, prompt_tokens, prompt_len, u, alpha, eps, kind, eos_id, ref_params, values)


def sequence_logprobs(params, tokens, mask, prompt_len, alpha=1.0, eps=0.0):
    """rlhf_ref.reinforce.sequence_logprobs on the GPU."""
    return _kernels().sequence_logprobs(params, tokens, mask, prompt_len, alpha, eps)


def _missing(name):
    raise NotImplementedError(f"the cuda backend does not implement {name}; use backend 'numba', "
                              f"'cython' or 'numpy' for it (the cuda backend does rollout and sequence_logprobs)")


def reinforce_loss_and_grad(params, tokens, mask, prompt_len, reward, cfg=None, ref_params=None, ref_logp=None,
                            *, group=None, old_logp=None, old_values=None):
    """Not implemented on CUDA: raises NotImplementedError."""
    _missing("reinforce_loss_and_grad")


def sft_loss_and_grad(params, tokens, mask):
    """Not implemented on CUDA: raises NotImplementedError."""
    _missing("sft_loss_and_grad")


def reward_forward(params, tokens, mask):
    """Not implemented on CUDA: raises NotImplementedError."""
    _missing("reward_forward")


def bt_loss_and_grad(params, chosen, chosen_mask, rejected, rejected_mask, margin=None):
    """Not implemented on CUDA: raises NotImplementedError."""
    _missing("bt_loss_and_grad")
