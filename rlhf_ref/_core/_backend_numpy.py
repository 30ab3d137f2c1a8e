"""The ``numpy`` backend: the reference itself, behind the backend interface (rlhf_ref.backends).

A thin adapter: each interface function IS the reference function (the same object, so a test
of the backend is a test of the reference), except ``reward_forward``, which drops the cache that
``reward_model.forward`` returns for its backward pass. The reference modules are imported on
first use (module ``__getattr__``), so importing this module is cheap and never fails.

    rollout                  = rlhf_ref.rollout.rollout
    sequence_logprobs        = rlhf_ref.reinforce.sequence_logprobs
    reinforce_loss_and_grad  = rlhf_ref.reinforce.loss_and_grad
    sft_loss_and_grad        = rlhf_ref.sft.loss_and_grad
    reward_forward(params, tokens, mask) = rlhf_ref.reward_model.forward(params, tokens, mask)[0]
    bt_loss_and_grad         = rlhf_ref.reward_model.bt_loss_and_grad
"""

from __future__ import annotations

import importlib

NAME = "numpy"

# interface name -> (reference module, function)
_REFERENCE = {
    "rollout": ("rlhf_ref.rollout", "rollout"),
    "sequence_logprobs": ("rlhf_ref.reinforce", "sequence_logprobs"),
    "reinforce_loss_and_grad": ("rlhf_ref.reinforce", "loss_and_grad"),
    "sft_loss_and_grad": ("rlhf_ref.sft", "loss_and_grad"),
    "bt_loss_and_grad": ("rlhf_ref.reward_model", "bt_loss_and_grad"),
}


def probe():
    """Always None: NumPy is the package's one dependency, so the reference always runs."""
    return None


def reward_forward(params, tokens, mask):
    """(B,) rewards read at each row's last real token: ``rlhf_ref.reward_model.forward`` minus its cache."""
    from .. import reward_model
    return reward_model.forward(params, tokens, mask)[0]


def __getattr__(name):
    try:
        modname, attr = _REFERENCE[name]
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    fn = getattr(importlib.import_module(modname), attr)
    globals()[name] = fn            # resolve once; later lookups are plain attribute reads
    return fn


def __dir__():
    return sorted(set(globals()) | set(_REFERENCE))
