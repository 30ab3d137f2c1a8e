"""The Gymnasium environment: check_env, seeded determinism, make_vec, rewards, errors, and that our
REINFORCE (through the backend interface) raises the return of episodes collected from the env."""

import numpy as np
import pytest

gym = pytest.importorskip("gymnasium")

import rlhf_ref.envs as envs  # noqa: E402  (registers the id)
from gymnasium.utils.env_checker import check_env  # noqa: E402
from rlhf_ref import lstm, optim, reinforce  # noqa: E402
from rlhf_ref.envs import ENV_ID, TextGenerationEnv  # noqa: E402
from rlhf_ref.tokenizer import BOS, EOS, PAD, Vocab  # noqa: E402

VOCAB = Vocab("ab ")
A = VOCAB.encode("a", bos=False)[0]


def count_a(prompt, response):
    return float(response.count("a"))


def small_env(**kw):
    args = dict(prompts=["ab", "ba ", "a"], vocab=VOCAB, reward=count_a, max_len=8)
    args.update(kw)
    return TextGenerationEnv(**args)


def test_registered_and_check_env_default():
    """The default config (embedded corpus, simulated annotator) passes the checker through make."""
    env = gym.make(ENV_ID)
    check_env(env.unwrapped)
    obs, info = env.reset(seed=3)
    assert obs.dtype == np.int64 and obs.shape == env.observation_space.shape
    assert obs[0] == BOS and info["prompt_len"] == info["length"] >= 1
    env.close()


@pytest.mark.parametrize("kl", [0.0, 0.1])
def test_check_env_small(kl):
    ref = lstm.init_params(len(VOCAB), 4, 8, np.random.default_rng(0), heads=("head",)) if kl else None
    env = gym.make(ENV_ID, prompts=["ab", "ba ", "a"], vocab=VOCAB, reward=count_a, max_len=8, kl_coef=kl,
                   ref_params=ref, render_mode="ansi")
    check_env(env.unwrapped)
    env.reset(seed=0)
    assert isinstance(env.render(), str)


def test_seeded_reset_and_episode_end():
    env = small_env()
    o1, i1 = env.reset(seed=11)
    o2, i2 = env.reset(seed=11)
    assert np.array_equal(o1, o2) and i1 == i2
    # EOS terminates, and the sequence reward arrives at that step
    env.reset(seed=0, options={"prompt": "b"})
    _, r, term, trunc, _ = env.step(A)
    assert (r, term, trunc) == (0.0, False, False)
    obs, r, term, trunc, info = env.step(EOS)
    assert term and not trunc and r == 1.0 and info["response"] == "a" and info["length"] == 4
    assert obs.tolist()[:4] == [BOS, VOCAB.encode("b", bos=False)[0], A, EOS] and obs[4:].tolist() == [PAD] * 4
    with pytest.raises(RuntimeError, match="reset"):
        env.step(A)
    # reaching max_len truncates
    env.reset(options={"prompt": "b"})
    for k in range(6):
        obs, r, term, trunc, info = env.step(A)
    assert trunc and not term and r == 6.0 and info["length"] == 8


def test_kl_shaping_is_beta_times_ref_logprob():
    ref = lstm.init_params(len(VOCAB), 4, 8, np.random.default_rng(1), heads=("head",))
    beta = 0.3
    env = small_env(kl_coef=beta, ref_params=ref, reward=lambda p, r: 0.0)
    env.reset(options={"prompt": "ab"})
    acts = [A, A, EOS]
    rewards = [env.step(a)[1] for a in acts]
    # the reference's own log-probs of the same tokens, through the batch API
    tokens = np.array([VOCAB.encode("ab").tolist() + acts])
    lp = reinforce.sequence_logprobs(ref, tokens, np.ones(tokens.shape), np.array([3]))
    np.testing.assert_allclose(rewards, beta * lp[0, 3:], rtol=1e-12, atol=1e-12)


def test_reward_model_reward():
    rm = lstm.init_params(len(VOCAB), 4, 8, np.random.default_rng(2), heads=("reward",))
    env = small_env(reward=rm)
    env.reset(options={"prompt": "a"})
    _, r, term, _, _ = env.step(EOS)
    from rlhf_ref import reward_model
    ids = VOCAB.encode("a", eos=True)[None]
    assert term and r == pytest.approx(float(reward_model.forward(rm, ids, np.ones(ids.shape))[0][0]))


def test_bad_arguments():
    env = small_env()
    env.reset(seed=0)
    for bad in (-1, len(VOCAB), 1.5, "a", True):
        with pytest.raises(ValueError, match="action"):
            env.step(bad)
    with pytest.raises(ValueError, match="max_len"):
        small_env(max_len=3)
    with pytest.raises(ValueError, match="ref_params"):
        small_env(kl_coef=0.1)
    with pytest.raises(TypeError, match="reward"):
        small_env(reward=3)


def test_make_vec_sync_and_async():
    kw = dict(prompts=["ab", "ba ", "a"], vocab=VOCAB, reward=count_a, max_len=8)
    for mode in ("sync", "async"):
        venv = gym.make_vec(ENV_ID, num_envs=3, vectorization_mode=mode, **kw)
        obs, info = venv.reset(seed=5)
        assert obs.shape == (3, 8) and obs.dtype == np.int64
        obs2, *_ = venv.step(np.full(3, A))
        assert np.all(obs2[np.arange(3), info["length"]] == A)
        venv.close()


# ---------------------------------------------------------------------------------------------
# "Any RL code can train on it; show that ours can."

def collect(venv, params, rng, n_episodes, alpha=1.0):
    """Run our LSTM policy in a vector env (NEXT_STEP autoreset) until n episodes have finished.

    Returns the final observations as an rlhf_ref episode batch (tokens, mask, prompt_len) and the
    episode returns. The policy reads the whole observation each step (max_len is tiny)."""
    from rlhf_ref import policy
    N = venv.num_envs
    obs, info = venv.reset(seed=int(rng.integers(2 ** 31)))
    length = info["length"].copy()
    ret = np.zeros(N)
    fresh = np.zeros(N, bool)                     # this step only resets the env (action ignored)
    toks, lens, pls, rets = [], [], [], []
    while len(rets) < n_episodes:
        mask = (np.arange(obs.shape[1])[None, :] < length[:, None]).astype(float)
        hs, cache = lstm.forward(params, obs, mask)
        h, _ = lstm.final_state(cache)
        z = lstm.linear(params["head.weight"], params["head.bias"], h)
        a = policy.sample(policy.logprobs(z, alpha), rng.random(N))
        obs, r, term, trunc, info = venv.step(a)
        ret += np.where(fresh, 0.0, r)
        done = (term | trunc) & ~fresh
        for i in np.nonzero(done)[0]:
            toks.append(obs[i].copy()); lens.append(info["length"][i]); pls.append(info["prompt_len"][i])
            rets.append(ret[i])
        ret[done | fresh] = 0.0
        fresh = done
        length = info["length"].copy()
    tokens = np.stack(toks[:n_episodes])
    mask = (np.arange(tokens.shape[1])[None, :] < np.array(lens[:n_episodes])[:, None]).astype(float)
    return tokens, mask, np.array(pls[:n_episodes]), np.array(rets[:n_episodes])


def test_our_reinforce_improves_return_on_the_env():
    from rlhf_ref import backends
    backend = backends.get("numpy")               # the reference backend, through the interface
    rng = np.random.default_rng(0)
    venv = gym.make_vec(ENV_ID, num_envs=8, vectorization_mode="sync", prompts=["ab", "ba ", "a"],
                        vocab=VOCAB, reward=count_a, max_len=8)
    params = lstm.init_params(len(VOCAB), 8, 16, rng, heads=("head", "value"))
    ref = {k: v.copy() for k, v in params.items() if not k.startswith("value.")}
    cfg = reinforce.ReinforceConfig(beta=0.0, baseline="loo")
    state = optim.adam_init(params)
    history = []
    for it in range(25):
        tokens, mask, pl, R = collect(venv, params, rng, 32)
        history.append(R.mean())
        out, grads = backend.reinforce_loss_and_grad(params, tokens, mask, pl, R, cfg=cfg, ref_params=ref)
        grads, _ = optim.clip_grad_norm(grads, 1.0)
        optim.adam_step(params, grads, state, lr=0.03)
    venv.close()
    first, last = np.mean(history[:3]), np.mean(history[-3:])
    # random play writes ~0.6 'a's; the best possible is 4-6 (the prompt's room)
    assert last > first + 2.5, history
