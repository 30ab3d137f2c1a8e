"""``rlhf_ref/TextGeneration-v0``: writing a response to a prompt, one token per step, as a Gymnasium env.

The same task the RL stage trains on, open to any RL code (Gymnasium ≥ 1.0)::

    import gymnasium as gym, rlhf_ref.envs
    env = gym.make("rlhf_ref/TextGeneration-v0")              # embedded corpus + simulated annotator
    obs, info = env.reset(seed=0)
    obs, reward, terminated, truncated, info = env.step(env.action_space.sample())

Episode. ``reset`` picks a prompt (from ``self.np_random``: seeded resets are reproducible) and
the observation is ``BOS + prompt`` right-padded with PAD (= 0) to ``max_len``. Each action is a
token id in ``Discrete(V)`` appended to the text. The episode **terminates** when the action is
EOS and is **truncated** when the text reaches ``max_len`` tokens (no room left). The observation
is always the whole text so far, ``Box(0, V−1, (max_len,), int64)``; ``info["length"]`` holds its
real length (use it rather than ``obs != 0``: an agent may itself emit the PAD id), and
``info["prompt_len"]`` the prompt's (BOS included), exactly the ``tokens``/``prompt_len`` layout of
``rlhf_ref`` (docs/conventions.md §2), so an episode's last observation feeds our REINFORCE as it is.

Reward. At the episode's last step, the sequence reward R(prompt, response):

- ``reward=None`` (default): the simulated annotator's true reward (``rlhf_ref.annotator``);
- a dict of reward-model parameters: ``reward_model.forward`` on ``BOS + prompt + response + EOS``;
- any callable ``reward(prompt, response) -> float`` (a rule, a human, another model).

Optional per-step KL shaping (``kl_coef`` = β > 0, needs ``ref_params`` = π_ref): at every step
``β·log π_ref(a_t|s_t)`` (π_ref scored with ``alpha``, ``eps``). That is the part of the KL-penalised
reward −β·(log π(a_t|s_t) − log π_ref(a_t|s_t)) that an environment can compute; an agent that
adds ``−β·log π(a_t|s_t)`` of its own policy (an entropy bonus) gets exactly the k1-shaped reward
of docs/conventions.md §3. ``info["ref_logp"]`` holds log π_ref(a_t|s_t).

``render_mode="ansi"`` returns the text so far.
"""

from __future__ import annotations

import numbers

import numpy as np

import gymnasium as gym
from gymnasium import spaces

from .. import lstm, policy, reward_model
from .._validate import check_range
from ..tokenizer import EOS, PAD, Vocab


MAX_LEN = 1 << 20     # the longest text an env holds (its buffers are allocated up front)


def _default_data():
    """Prompts (the training split) and the vocabulary of the embedded corpus."""
    from .. import data
    return list(data.default_split().train), data.default_vocab()


def _default_reward():
    from ..annotator import SimulatedAnnotator
    ann = SimulatedAnnotator()
    return lambda prompt, response: float(ann.true_reward(response, prompt))


class TextGenerationEnv(gym.Env):
    """Token-by-token text generation with a reward at the end of the episode; see the module docstring.

    prompts     list of prompt strings (default: the embedded corpus's training prompts)
    vocab       rlhf_ref.tokenizer.Vocab (default: the embedded corpus's)
    reward      None (simulated annotator), reward-model params (dict), or callable(prompt, response)
    max_len     observation length: BOS + prompt + response ≤ max_len tokens
    kl_coef     β of the per-step shaping β·log π_ref(a_t|s_t) (0: off)
    ref_params  π_ref for the shaping (a policy parameter dict)
    alpha, eps  the policy π_ref is scored with
    """

    metadata = {"render_modes": ["ansi"], "render_fps": 4}

    def __init__(self, prompts=None, vocab=None, reward=None, max_len=64, kl_coef=0.0, ref_params=None,
                 alpha=1.0, eps=0.0, render_mode=None):
        if prompts is None or vocab is None:
            d_prompts, d_vocab = _default_data()
            prompts = d_prompts if prompts is None else prompts
            vocab = d_vocab if vocab is None else vocab
        if not isinstance(vocab, Vocab):
            raise TypeError(f"vocab must be a rlhf_ref.tokenizer.Vocab, got {type(vocab).__name__}")
        self.vocab = vocab
        V = len(vocab)
        if isinstance(max_len, (bool, np.bool_)) or not isinstance(max_len, numbers.Integral) \
                or not 2 <= max_len <= MAX_LEN:
            raise ValueError(f"max_len must be an integer in [2, {MAX_LEN}], got {max_len!r}")
        self.max_len = int(max_len)
        self.prompts = [str(p) for p in prompts]
        if not self.prompts:
            raise ValueError("prompts must not be empty")
        self._encoded = [vocab.encode(p, errors="replace") for p in self.prompts]
        longest = max(len(e) for e in self._encoded)
        if self.max_len < longest + 1:
            raise ValueError(f"max_len={self.max_len} leaves no room for a response: the longest prompt takes "
                             f"{longest} tokens (BOS included); use max_len >= {longest + 1}")
        self.kl_coef = check_range(kl_coef, "kl_coef", lo=0.0)
        self.alpha, self.eps, _ = policy.check_policy_args(alpha, eps)
        self.ref_params = None
        if self.kl_coef > 0 and ref_params is None:
            raise ValueError("kl_coef > 0 needs ref_params (the reference policy π_ref)")
        if ref_params is not None:
            Vr, _, _ = lstm.check_model(ref_params, ("head",), name="ref_params")
            if Vr != V:
                raise ValueError(f"ref_params has vocabulary size {Vr}, the env's vocabulary has {V}")
            self.ref_params = ref_params
        if reward is None:
            reward = _default_reward()
        if isinstance(reward, dict):
            Vr, _, _ = lstm.check_model(reward, ("reward",), name="reward model")
            if Vr != V:
                raise ValueError(f"the reward model has vocabulary size {Vr}, the env's vocabulary has {V}")
            rm = reward

            def reward(prompt, response):
                ids = vocab.encode(prompt + response, eos=True, errors="replace")[None, :]
                return float(reward_model.forward(rm, ids, np.ones(ids.shape))[0][0])
        elif not callable(reward):
            raise TypeError(f"reward must be None, reward-model params (dict) or a callable, got {type(reward).__name__}")
        self.reward_fn = reward
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"render_mode must be None or one of {self.metadata['render_modes']}, got {render_mode!r}")
        self.render_mode = render_mode

        self.action_space = spaces.Discrete(V)
        self.observation_space = spaces.Box(low=0, high=V - 1, shape=(self.max_len,), dtype=np.int64)
        self._tokens = np.full(self.max_len, PAD, dtype=np.int64)
        self._len = 0
        self._prompt_len = 0
        self._prompt = ""
        self._done = True

    # -- helpers ---------------------------------------------------------------------------------
    def _ref_advance(self, ids):
        """Feed tokens to π_ref's LSTM and keep the log-distribution of the next token."""
        for i in ids:
            self._h, self._c = lstm.step(self.ref_params, np.array([i]), self._h, self._c)
        z = lstm.linear(self.ref_params["head.weight"], self.ref_params["head.bias"], self._h)
        self._ref_logq = policy.logprobs(z, self.alpha, self.eps)[0]

    def _info(self):
        return {"length": self._len, "prompt_len": self._prompt_len}

    def response_text(self):
        return self.vocab.decode(self._tokens[self._prompt_len:self._len])

    # -- the Gymnasium API -----------------------------------------------------------------------
    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        options = options or {}
        if "prompt" in options:
            self._prompt = str(options["prompt"])
            enc = self.vocab.encode(self._prompt, errors="replace")
            if len(enc) + 1 > self.max_len:
                raise ValueError(f"prompt takes {len(enc)} tokens; max_len={self.max_len} leaves no room for a response")
        else:
            k = int(self.np_random.integers(len(self.prompts)))
            self._prompt, enc = self.prompts[k], self._encoded[k]
        self._tokens[:] = PAD
        self._tokens[:len(enc)] = enc
        self._len = self._prompt_len = len(enc)
        self._done = False
        if self.ref_params is not None:
            H = self.ref_params["lstm.weight_hh_l0"].shape[1]
            dt = self.ref_params["head.weight"].dtype
            self._h, self._c = np.zeros((1, H), dt), np.zeros((1, H), dt)
            self._ref_advance(enc)
        info = self._info()
        info["prompt"] = self._prompt
        return self._tokens.copy(), info

    def step(self, action):
        if self._done:
            raise RuntimeError("the episode has ended: call reset() before step()")
        if isinstance(action, np.ndarray) and action.ndim == 0:
            action = action.item()
        if isinstance(action, (bool, np.bool_)) or not isinstance(action, numbers.Integral):
            raise ValueError(f"action must be an integer token id in [0, {self.action_space.n}), got {action!r}")
        a = int(action)
        if not 0 <= a < self.action_space.n:
            raise ValueError(f"action must be a token id in [0, {self.action_space.n}), got {a}")
        reward = 0.0
        info = {}
        if self.ref_params is not None:
            info["ref_logp"] = float(self._ref_logq[a])
            reward += self.kl_coef * info["ref_logp"]
        self._tokens[self._len] = a
        self._len += 1
        terminated = a == EOS
        truncated = (not terminated) and self._len >= self.max_len
        if terminated or truncated:
            self._done = True
            response = self.response_text()
            R = float(self.reward_fn(self._prompt, response))
            reward += R
            info.update(response=response, sequence_reward=R)
        elif self.ref_params is not None:
            self._ref_advance([a])
        info.update(self._info())
        return self._tokens.copy(), float(reward), bool(terminated), bool(truncated), info

    def render(self):
        if self.render_mode == "ansi":
            return self._prompt + "|" + self.response_text()
        return None
