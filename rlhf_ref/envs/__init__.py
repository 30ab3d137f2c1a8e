"""Gymnasium environments (optional: ``pip install "rlhf_ref[gym]"``, gymnasium >= 1.0).

Importing this package registers ``rlhf_ref/TextGeneration-v0`` (``TextGenerationEnv``)::

    import gymnasium as gym
    import rlhf_ref.envs
    env = gym.make("rlhf_ref/TextGeneration-v0", max_len=64)
    envs = gym.make_vec("rlhf_ref/TextGeneration-v0", num_envs=8, vectorization_mode="sync")

``import rlhf_ref`` never imports this package, so NumPy alone remains enough for the rest.
"""

from __future__ import annotations

ENV_ID = "rlhf_ref/TextGeneration-v0"

try:
    import gymnasium as _gym
except Exception as _e:  # ImportError, or a broken install
    raise ImportError(f"rlhf_ref.envs needs gymnasium>=1.0 (pip install 'rlhf_ref[gym]'): "
                      f"{type(_e).__name__}: {_e}") from _e

_major = int(_gym.__version__.split(".")[0])
if _major < 1:
    raise ImportError(f"rlhf_ref.envs needs gymnasium>=1.0, found {_gym.__version__}")

from .text_generation import TextGenerationEnv  # noqa: E402

if ENV_ID not in _gym.registry:
    _gym.register(id=ENV_ID, entry_point="rlhf_ref.envs.text_generation:TextGenerationEnv")

__all__ = ["ENV_ID", "TextGenerationEnv"]
