"""Bad input: every public function of the reference rejects it with a ValueError or TypeError whose
message names the argument (and, where it helps, what was expected and what was got).

Each case is one row: (id, callable, exception type, regex the message must match).
"""

import re

import numpy as np
import pytest

from rlhf_ref import conventions, exact, lstm, model, optim, policy, reinforce, returns, reward_model, rollout, sft, tokenizer
from rlhf_ref.reinforce import ReinforceConfig as Cfg

V, E, H = 6, 3, 4
_rng = np.random.default_rng(0)
P = lstm.init_params(V, E, H, _rng)
REF = lstm.init_params(V, E, H, _rng, heads=("head",))
RM = lstm.init_params(V, E, H, _rng, heads=("reward",))
TOK = np.array([[1, 4, 5, 2], [1, 3, 4, 0]])
MASK = np.array([[1, 1, 1, 1], [1, 1, 1, 0]], float)
PL = np.array([1, 2])
R = np.array([1.0, 2.0])
U = _rng.random((2, 4))
Z = _rng.standard_normal((3, V))
AM = model.action_mask(MASK, PL)


def rl(**kw):
    args = dict(params=P, tokens=TOK, mask=MASK, prompt_len=PL, reward=R, ref_params=REF)
    args.update(kw)
    return lambda: reinforce.loss_and_grad(**args)


def ro(**kw):
    args = dict(params=P, prompt_tokens=TOK, prompt_len=PL, u=U)
    args.update(kw)
    return lambda: rollout.rollout(**args)


def without(d, *prefixes):
    return {k: v for k, v in d.items() if not k.startswith(prefixes)}


def cache():
    return model.forward(P, TOK, MASK)[1]


def lcache():
    return lstm.forward(P, TOK, MASK)[1]


G0 = {k: np.zeros_like(v) for k, v in P.items()}

CASES = [
    # ---- the episode batch: tokens, mask, prompt_len, reward
    ("tokens float", rl(tokens=TOK.astype(float)), TypeError, r"tokens must be an integer array, got dtype float64"),
    ("tokens bool", rl(tokens=TOK > 2), TypeError, r"tokens must be an integer array"),
    ("tokens 1-D", rl(tokens=TOK[0]), ValueError, r"tokens must have 2 dimensions, got shape \(4,\)"),
    ("tokens >= V", rl(tokens=np.where(TOK == 5, 6, TOK)), ValueError, r"tokens must lie in \[0, 6\) on real positions; tokens\[0, 2\] = 6"),
    ("tokens < 0", rl(tokens=np.where(TOK == 5, -1, TOK)), ValueError, r"tokens must lie in \[0, 6\).*tokens\[0, 2\] = -1"),
    ("mask shape", rl(mask=MASK[:, :3]), ValueError, r"mask must have shape \(2, 4\), got \(2, 3\)"),
    ("mask not 0/1", rl(mask=MASK * 2), ValueError, r"mask must contain only 0 and 1"),
    ("mask NaN", rl(mask=np.where(MASK == 0, np.nan, MASK)), ValueError, r"mask must contain only 0 and 1"),
    ("mask strings", rl(mask=MASK.astype(str)), TypeError, r"mask must be a 0/1 numeric or bool array"),
    ("mask left-padded", rl(mask=np.array([[0, 1, 1, 1], [1, 1, 1, 0]], float)), ValueError,
     r"mask must be right-padded.*row 0 is \[0, 1, 1, 1\]"),
    ("mask with a hole", rl(mask=np.array([[1, 1, 0, 1], [1, 1, 1, 0]], float)), ValueError, r"mask must be right-padded"),
    ("prompt_len 0", rl(prompt_len=np.array([0, 2])), ValueError, r"prompt_len must be >= 1 .*prompt_len\[0\] = 0"),
    ("prompt_len < 0", rl(prompt_len=np.array([-1, 2])), ValueError, r"prompt_len must be >= 1"),
    ("prompt_len > row length", rl(prompt_len=np.array([1, 4])), ValueError,
     r"prompt_len must lie in \[1, row length\]; prompt_len\[1\] = 4 with row length 3"),
    ("prompt_len float", rl(prompt_len=np.array([1.0, 2.0])), TypeError, r"prompt_len must be an integer array"),
    ("prompt_len shape", rl(prompt_len=np.array([1, 2, 3])), ValueError, r"prompt_len must have shape \(2\), got \(3,\)"),
    ("reward shape", rl(reward=np.array([1.0])), ValueError, r"reward must have shape \(2\), got \(1,\)"),
    ("reward NaN", rl(reward=np.array([np.nan, 1.0])), ValueError, r"reward must be finite, got nan at index \(0,\)"),
    ("reward inf", rl(reward=np.array([1.0, -np.inf])), ValueError, r"reward must be finite, got -inf at index \(1,\)"),
    ("reward strings", rl(reward=np.array(["a", "b"])), TypeError, r"reward must be a real numeric array"),
    ("no action", rl(prompt_len=np.array([4, 3])), ValueError, r"the batch has no action \(action_mask is all 0\)"),
    # ---- parameter dicts
    ("params not a dict", rl(params=[1, 2]), TypeError, r"params must be a dict of arrays, got list"),
    ("params missing key", rl(params=without(P, "head.bias")), ValueError, r"params is missing \['head.bias'\]"),
    ("params missing critic", rl(params=without(P, "value")), ValueError, r"params is missing \['value.bias', 'value.weight'\]"),
    ("params missing qvalue critic", rl(cfg=Cfg(baseline="qvalue")), ValueError, r"params is missing \['qvalue.bias', 'qvalue.weight'\]"),
    ("params extra key", rl(params={**P, "foo": np.zeros(3)}), ValueError, r"params has unexpected keys \['foo'\]"),
    ("params wrong shape", rl(params={**P, "head.bias": np.zeros(V + 1)}), ValueError,
     r"params\['head.bias'\] must have shape \(6,\), got \(7,\)"),
    ("params wrong shape W_ih", rl(params={**P, "lstm.weight_ih_l0": np.zeros((4 * H, E + 1))}), ValueError,
     r"params\['lstm.weight_ih_l0'\] must have shape \(16, 3\), got \(16, 4\)"),
    ("params mixed dtypes", rl(params={**P, "head.bias": P["head.bias"].astype(np.float32)}), TypeError,
     r"params mixes dtypes \['float32', 'float64'\]"),
    ("params int dtype", rl(params={**P, "head.bias": np.zeros(V, int)}), TypeError,
     r"params\['head.bias'\] must be a float32 or float64 ndarray, got ndarray int64"),
    ("params float16", rl(params={**P, "head.bias": np.zeros(V, np.float16)}), TypeError, r"params\['head.bias'\] must be a float32 or float64"),
    ("params list entry", rl(params={**P, "head.bias": [0.0] * V}), TypeError, r"params\['head.bias'\] must be a float32 or float64 ndarray, got list"),
    ("params NaN", rl(params={**P, "head.bias": np.full(V, np.nan)}), ValueError, r"params\['head.bias'\] must be finite"),
    ("params inf", rl(params={**P, "lstm.weight_hh_l0": np.full((4 * H, H), np.inf)}), ValueError,
     r"params\['lstm.weight_hh_l0'\] must be finite"),
    ("params no embedding", rl(params=without(P, "embedding")), ValueError, r"params must hold 'embedding.weight'"),
    ("ref_params missing head", rl(ref_params=without(REF, "head")), ValueError, r"ref_params is missing \['head.bias', 'head.weight'\]"),
    ("ref_params other vocabulary", rl(ref_params=lstm.init_params(V + 1, E, H, _rng, heads=("head",))), ValueError,
     r"ref_params has vocabulary 7, params has 6"),
    ("ref_params NaN", rl(ref_params={**REF, "head.weight": np.full((V, H), np.nan)}), ValueError, r"ref_params\['head.weight'\] must be finite"),
    ("ref_params and ref_logp", rl(ref_logp=np.zeros((2, 4))), ValueError, r"give exactly one of ref_params .* or ref_logp"),
    ("neither ref_params nor ref_logp", rl(ref_params=None), ValueError, r"give exactly one of ref_params .* or ref_logp"),
    ("ref_logp shape", rl(ref_params=None, ref_logp=np.zeros((2, 3))), ValueError, r"ref_logp must have shape \(2, 4\), got \(2, 3\)"),
    ("ref_logp NaN", rl(ref_params=None, ref_logp=np.full((2, 4), np.nan)), ValueError, r"ref_logp must be finite"),
    ("cfg a dict", rl(cfg={"alpha": 1.0}), TypeError, r"cfg must be a ReinforceConfig, got dict"),
    # ---- conventions and coefficients
    ("alpha 0", lambda: Cfg(alpha=0), ValueError, r"alpha must be > 0.0, got 0"),
    ("alpha < 0", lambda: Cfg(alpha=-1.0), ValueError, r"alpha must be > 0.0, got -1.0"),
    ("alpha NaN", lambda: Cfg(alpha=np.nan), ValueError, r"alpha must be finite, got nan"),
    ("alpha inf", lambda: Cfg(alpha=np.inf), ValueError, r"alpha must be finite, got inf"),
    ("alpha a string", lambda: Cfg(alpha="1"), TypeError, r"alpha must be a real number, got str '1'"),
    ("alpha a bool", lambda: Cfg(alpha=True), TypeError, r"alpha must be a real number, got bool"),
    ("eps < 0", lambda: Cfg(eps=-0.1), ValueError, r"eps must be >= 0.0, got -0.1"),
    ("eps > 1", lambda: Cfg(eps=1.1), ValueError, r"eps must be <= 1.0, got 1.1"),
    ("gamma < 0", lambda: Cfg(gamma=-0.1), ValueError, r"gamma must be >= 0.0, got -0.1"),
    ("gamma > 1", lambda: Cfg(gamma=1.5), ValueError, r"gamma must be <= 1.0, got 1.5"),
    ("beta < 0", lambda: Cfg(beta=-1e-3), ValueError, r"beta must be >= 0.0, got -0.001"),
    ("entropy_coef < 0", lambda: Cfg(entropy_coef=-1), ValueError, r"entropy_coef must be >= 0.0"),
    ("value_coef < 0", lambda: Cfg(value_coef=-1), ValueError, r"value_coef must be >= 0.0"),
    ("whiten a bool", lambda: Cfg(whiten=True), ValueError, r"whiten must be one of"),
    ("shift_mean an int", lambda: Cfg(shift_mean=1), TypeError, r"shift_mean must be a bool, got 1"),
    ("loo with one row", lambda: reinforce.loss_and_grad(P, TOK[:1], MASK[:1], PL[:1], R[:1], Cfg(baseline="loo"), ref_params=REF),
     ValueError, r"baseline='loo' needs at least two rows with an action, got 1"),
    ("loo with one row acting", rl(prompt_len=np.array([1, 3]), cfg=Cfg(baseline="loo")), ValueError,
     r"baseline='loo' needs at least two rows with an action, got 1"),
    ("bessel with one action", rl(prompt_len=np.array([3, 3]), cfg=Cfg(whiten="bessel")), ValueError,
     r"whiten='bessel' needs two or more actions, got 1"),
    # ---- the lower-level functions of returns.py and reinforce.py
    ("kl estimator unknown", lambda: returns.kl_per_token(np.zeros((2, 4)), np.zeros((2, 4)), AM, "k5"), ValueError, r"kl must be one of"),
    ("kl_estimate unknown", lambda: returns.kl_estimate(np.zeros(3), "k5"), ValueError, r"kl must be one of"),
    ("shaped_rewards beta", lambda: returns.shaped_rewards(np.zeros((2, 4)), R, AM, -1.0), ValueError, r"beta must be >= 0.0"),
    ("shaped_rewards reward shape", lambda: returns.shaped_rewards(np.zeros((2, 4)), np.zeros(3), AM, 0.1), ValueError,
     r"sequence_reward must have shape \(2\), got \(3,\)"),
    ("returns gamma", lambda: returns.discounted_returns(np.zeros((2, 4)), AM, 2.0), ValueError, r"gamma must be <= 1.0, got 2.0"),
    ("returns kind", lambda: returns.discounted_returns(np.zeros((2, 4)), AM, 1.0, "vtrace"), ValueError, r"returns must be one of"),
    ("baseline kind", lambda: returns.baseline("avg", np.zeros((2, 4)), AM), ValueError, r"baseline must be one of"),
    ("value baseline without values", lambda: returns.baseline("value", np.zeros((2, 4)), AM), ValueError,
     r"baseline='value' needs values"),
    ("qvalue baseline without Q", lambda: returns.baseline("qvalue", np.zeros((2, 4)), AM), ValueError, r"baseline='qvalue' needs qvalues"),
    ("whiten kind", lambda: returns.whiten(np.zeros((2, 4)), AM, "std"), ValueError, r"whiten must be one of"),
    ("whiten no action", lambda: returns.whiten(np.zeros((1, 4)), np.zeros((1, 4)), "population"), ValueError,
     r"whiten='population' needs one or more actions, got 0"),
    ("aggregation no action", lambda: reinforce.aggregation_weights(np.zeros((2, 4))), ValueError, r"the batch has no action"),
    ("aggregation kind", lambda: reinforce.aggregation_weights(AM, "mean"), ValueError, r"aggregation must be one of"),
    ("sequence_logprobs alpha", lambda: reinforce.sequence_logprobs(P, TOK, MASK, PL, alpha=0.0), ValueError, r"alpha must be > 0.0"),
    ("sequence_logprobs eps", lambda: reinforce.sequence_logprobs(P, TOK, MASK, PL, eps=1.5), ValueError, r"eps must be <= 1.0"),
    # ---- the LSTM and the model
    ("h0 shape", lambda: lstm.forward(P, TOK, MASK, h0=np.zeros((2, H + 1))), ValueError, r"h0 must have shape \(2, 4\), got \(2, 5\)"),
    ("c0 shape", lambda: lstm.forward(P, TOK, MASK, c0=np.zeros((3, H))), ValueError, r"c0 must have shape \(2, 4\), got \(3, 4\)"),
    ("h0 NaN", lambda: lstm.forward(P, TOK, MASK, h0=np.full((2, H), np.nan)), ValueError, r"h0 must be finite"),
    ("c0 inf", lambda: lstm.forward(P, TOK, MASK, c0=np.full((2, H), np.inf)), ValueError, r"c0 must be finite"),
    ("lstm tokens 3-D", lambda: lstm.forward(P, TOK[None], MASK), ValueError, r"tokens must have 2 dimensions"),
    ("lstm tokens out of range", lambda: lstm.forward(P, TOK + 3, MASK), ValueError, r"tokens must lie in \[0, 6\)"),
    ("dhs shape", lambda: lstm.backward(np.zeros((2, 4, H + 1)), lcache()), ValueError, r"dhs must have shape \(2, 4, 4\), got \(2, 4, 5\)"),
    ("dhs NaN", lambda: lstm.backward(np.full((2, 4, H), np.nan), lcache()), ValueError, r"dhs must be finite"),
    ("dh_final shape", lambda: lstm.backward(np.zeros((2, 4, H)), lcache(), dh_final=np.zeros((3, H))), ValueError,
     r"dh_final must have shape \(2, 4\), got \(3, 4\)"),
    ("dc_final NaN", lambda: lstm.backward(np.zeros((2, 4, H)), lcache(), dc_final=np.full((2, H), np.nan)), ValueError,
     r"dc_final must be finite"),
    ("init V 0", lambda: lstm.init_params(0, E, H, _rng), ValueError, r"V must be a positive integer, got 0"),
    ("init H fractional", lambda: lstm.init_params(V, E, 2.5, _rng), ValueError, r"H must be a positive integer, got 2.5"),
    ("init rng not a Generator", lambda: lstm.init_params(V, E, H, 0), TypeError, r"rng must be a numpy.random.Generator, got int"),
    ("init head unknown", lambda: lstm.init_params(V, E, H, _rng, heads=("foo",)), ValueError, r"heads must be among .*got 'foo'"),
    ("init dtype int", lambda: lstm.init_params(V, E, H, _rng, dtype=np.int64), TypeError, r"dtype must be float32 or float64, got int64"),
    ("dscores shape", lambda: model.backward(cache(), dscores=np.zeros((2, 4, V + 1))), ValueError,
     r"dscores must have shape \(2, 4, 6\), got \(2, 4, 7\)"),
    ("dvalues shape", lambda: model.backward(cache(), dvalues=np.zeros((2, 3))), ValueError, r"dvalues must have shape \(2, 4\), got \(2, 3\)"),
    ("dqvalues without the head", lambda: model.backward(cache(), dqvalues=np.zeros((2, 4, V))), ValueError,
     r"dqvalues given but params has no 'qvalue' head"),
    ("dscores NaN", lambda: model.backward(cache(), dscores=np.full((2, 4, V), np.nan)), ValueError, r"dscores must be finite"),
    # ---- the policy
    ("logprobs alpha", lambda: policy.logprobs(Z, 0.0), ValueError, r"alpha must be > 0.0, got 0.0"),
    ("logprobs eps", lambda: policy.logprobs(Z, 1.0, 2.0), ValueError, r"eps must be <= 1.0, got 2.0"),
    ("logprobs kind", lambda: policy.logprobs(Z, 1.0, 0.0, "softmax"), ValueError, r"policy must be one of .*got 'softmax'"),
    ("greedy with eps", lambda: policy.logprobs(Z, 1.0, 0.1, "greedy"), ValueError, r"eps must be 0 for the greedy policy, got 0.1"),
    ("logprobs z NaN", lambda: policy.logprobs(np.full((2, V), np.nan)), ValueError, r"z must be finite"),
    ("logprobs z inf", lambda: policy.logprobs(np.full((2, V), -np.inf)), ValueError, r"z must be finite"),
    ("logprobs z strings", lambda: policy.logprobs(np.array([["a", "b"]])), TypeError, r"z must be a real numeric array"),
    ("logprobs z scalar", lambda: policy.logprobs(np.float64(1.0)), ValueError, r"z must have shape \(\.\.\., V\)"),
    ("grad_logprob alpha", lambda: policy.grad_logprob(Z, np.zeros(3, int), np.ones(3), 0.0), ValueError, r"alpha must be > 0.0"),
    ("grad_logprob eps", lambda: policy.grad_logprob(Z, np.zeros(3, int), np.ones(3), 1.0, 2.0), ValueError, r"eps must be <= 1.0"),
    ("grad_logprob actions >= V", lambda: policy.grad_logprob(Z, np.full(3, V), np.ones(3)), ValueError,
     r"actions must lie in \[0, 6\); actions\[\(0,\)\] = 6"),
    ("grad_logprob actions float", lambda: policy.grad_logprob(Z, np.zeros(3), np.ones(3)), TypeError, r"actions must be an integer array"),
    ("grad_logprob actions shape", lambda: policy.grad_logprob(Z, np.zeros(4, int), np.ones(3)), ValueError, r"actions must have shape \(3\)"),
    ("grad_logprob upstream shape", lambda: policy.grad_logprob(Z, np.zeros(3, int), np.ones(4)), ValueError, r"upstream must have shape \(3\)"),
    ("grad_logprob upstream NaN", lambda: policy.grad_logprob(Z, np.zeros(3, int), np.full(3, np.nan)), ValueError, r"upstream must be finite"),
    ("grad_entropy eps", lambda: policy.grad_entropy(Z, np.ones(3), 1.0, -1.0), ValueError, r"eps must be >= 0.0"),
    ("grad_entropy upstream shape", lambda: policy.grad_entropy(Z, np.ones((3, 1))), ValueError, r"upstream must have shape \(3\)"),
    ("sample u = 1", lambda: policy.sample(policy.logprobs(Z), np.array([0.1, 1.0, 0.2])), ValueError, r"u must hold uniforms in \[0, 1\)"),
    ("sample u < 0", lambda: policy.sample(policy.logprobs(Z), np.array([0.1, -0.1, 0.2])), ValueError, r"u must hold uniforms in \[0, 1\)"),
    ("sample u NaN", lambda: policy.sample(policy.logprobs(Z), np.array([0.1, np.nan, 0.2])), ValueError, r"u must be finite"),
    ("sample u shape", lambda: policy.sample(policy.logprobs(Z), np.array([0.1, 0.2])), ValueError, r"u must have shape \(3\), got \(2,\)"),
    ("sample logq NaN", lambda: policy.sample(np.full((3, V), np.nan), np.zeros(3)), ValueError, r"logq must hold log-probabilities"),
    ("sample logq 1-D", lambda: policy.sample(np.zeros(V), np.zeros(1)), ValueError, r"logq must have 2 dimensions"),
    # ---- SFT, the reward model
    ("sft no target", lambda: sft.loss_and_grad(P, TOK[:, :1], MASK[:, :1]), ValueError, r"the batch has no next-token target"),
    ("sft tokens out of range", lambda: sft.loss_and_grad(P, TOK + 5, MASK), ValueError, r"tokens must lie in \[0, 6\)"),
    ("sft without head", lambda: sft.loss_and_grad(RM, TOK, MASK), ValueError, r"params is missing \['head.bias', 'head.weight'\]"),
    ("reward model without reward head", lambda: reward_model.forward(P, TOK, MASK), ValueError, r"params is missing \['reward.bias', 'reward.weight'\]"),
    ("reward model empty row", lambda: reward_model.forward(RM, TOK, np.array([[1, 1, 1, 1], [0, 0, 0, 0.0]])), ValueError,
     r"tokens row 1 is empty"),
    ("bt empty chosen row", lambda: reward_model.bt_loss_and_grad(RM, TOK, np.array([[1, 1, 1, 1], [0, 0, 0, 0.0]]), TOK, MASK),
     ValueError, r"chosen row 1 is empty"),
    ("bt rows differ", lambda: reward_model.bt_loss_and_grad(RM, TOK, MASK, TOK[:1], MASK[:1]), ValueError,
     r"chosen and rejected must have the same number of rows, got 2 and 1"),
    ("bt margin shape", lambda: reward_model.bt_loss_and_grad(RM, TOK, MASK, TOK, MASK, margin=np.zeros(3)), ValueError,
     r"margin must have shape \(2\), got \(3,\)"),
    ("bt margin NaN", lambda: reward_model.bt_loss_and_grad(RM, TOK, MASK, TOK, MASK, margin=np.array([np.nan, 0.0])), ValueError,
     r"margin must be finite"),
    ("bt mask not 0/1", lambda: reward_model.bt_loss_and_grad(RM, TOK, MASK * 2, TOK, MASK), ValueError, r"mask must contain only 0 and 1"),
    ("bt tokens out of range", lambda: reward_model.bt_loss_and_grad(RM, TOK, MASK, TOK + 9, MASK), ValueError, r"tokens must lie in \[0, 6\)"),
    ("bt no pairs", lambda: reward_model.bt_loss_and_grad(RM, TOK[:0], MASK[:0], TOK[:0], MASK[:0]), ValueError, r"no preference pairs"),
    # ---- rollouts
    ("rollout u = 1", ro(u=np.where(U > 0.5, 1.0, U)), ValueError, r"u must hold uniforms in \[0, 1\)"),
    ("rollout u < 0", ro(u=-U), ValueError, r"u must hold uniforms in \[0, 1\)"),
    ("rollout u NaN", ro(u=np.full((2, 4), np.nan)), ValueError, r"u must be finite"),
    ("rollout u shape", ro(u=U[:, :3]), ValueError, r"u must have shape \(2, 4\), got \(2, 3\)"),
    ("rollout prompt_len 0", ro(prompt_len=np.array([0, 1])), ValueError, r"prompt_len must lie in \[1, 4\] \(BOS included\); prompt_len\[0\] = 0"),
    ("rollout prompt_len > T", ro(prompt_len=np.array([5, 1])), ValueError, r"prompt_len must lie in \[1, 4\]"),
    ("rollout prompt_len float", ro(prompt_len=np.array([1.0, 1.0])), TypeError, r"prompt_len must be an integer array"),
    ("rollout prompt out of range", ro(prompt_tokens=TOK + 6), ValueError, r"prompt_tokens must lie in \[0, 6\) within the prompt"),
    ("rollout prompt float", ro(prompt_tokens=TOK.astype(float)), TypeError, r"prompt_tokens must be an integer array"),
    ("rollout alpha", ro(alpha=0), ValueError, r"alpha must be > 0.0"),
    ("rollout eps", ro(eps=-0.5), ValueError, r"eps must be >= 0.0"),
    ("rollout kind", ro(kind="topk"), ValueError, r"policy must be one of"),
    ("rollout eos_id", ro(eos_id=V), ValueError, r"eos_id must lie in \[0, 6\), got 6"),
    ("rollout values without head", ro(params=REF, values=True), ValueError, r"params is missing \['value.bias', 'value.weight'\]"),
    ("rollout ref_params vocabulary", ro(ref_params=lstm.init_params(V + 1, E, H, _rng, heads=("head",))), ValueError,
     r"ref_params has vocabulary 7, params has 6"),
    ("rollout ref_params missing head", ro(ref_params=without(REF, "head")), ValueError, r"ref_params is missing"),
    # ---- optimisers
    ("sgd lr < 0", lambda: optim.sgd_step(dict(P), G0, -1.0), ValueError, r"lr must be >= 0.0, got -1.0"),
    ("sgd grads missing key", lambda: optim.sgd_step(dict(P), without(G0, "head.bias"), 0.1), ValueError, r"grads is missing \['head.bias'\]"),
    ("sgd grads extra key", lambda: optim.sgd_step(dict(P), {**G0, "foo": np.zeros(2)}, 0.1), ValueError, r"grads has unexpected keys \['foo'\]"),
    ("sgd grads shape", lambda: optim.sgd_step(dict(P), {**G0, "head.bias": np.zeros(2)}, 0.1), ValueError,
     r"grads\['head.bias'\] must have shape \(6,\), got \(2,\)"),
    ("sgd grads NaN", lambda: optim.sgd_step(dict(P), {**G0, "head.bias": np.full(V, np.nan)}, 0.1), ValueError, r"grads\['head.bias'\] must be finite"),
    ("adam beta1 = 1", lambda: optim.adam_step(dict(P), G0, optim.adam_init(P), betas=(1.0, 0.9)), ValueError, r"betas\[0\] must be < 1.0"),
    ("adam beta2 < 0", lambda: optim.adam_step(dict(P), G0, optim.adam_init(P), betas=(0.9, -0.1)), ValueError, r"betas\[1\] must be >= 0.0"),
    ("adam eps 0", lambda: optim.adam_step(dict(P), G0, optim.adam_init(P), eps=0), ValueError, r"eps must be > 0.0, got 0"),
    ("adam lr NaN", lambda: optim.adam_step(dict(P), G0, optim.adam_init(P), lr=np.nan), ValueError, r"lr must be finite, got nan"),
    ("adam grads inf", lambda: optim.adam_step(dict(P), {**G0, "head.bias": np.full(V, np.inf)}, optim.adam_init(P)), ValueError,
     r"grads\['head.bias'\] must be finite"),
    ("clip max_norm 0", lambda: optim.clip_grad_norm(G0, 0), ValueError, r"max_norm must be > 0.0, got 0"),
    ("clip grads NaN", lambda: optim.clip_grad_norm({**G0, "head.bias": np.full(V, np.nan)}, 1.0), ValueError, r"grads\['head.bias'\] must be finite"),
    ("clip grads not a dict", lambda: optim.clip_grad_norm([1.0], 1.0), TypeError, r"grads must be a dict of arrays"),
    # ---- tokenizer
    ("vocab duplicates", lambda: tokenizer.Vocab("aba"), ValueError, r"chars must be distinct, got duplicates \['a'\]"),
    ("vocab multi-char entry", lambda: tokenizer.Vocab(["ab"]), ValueError, r"chars must be single characters, got 'ab'"),
    ("encode unknown character", lambda: tokenizer.Vocab("ab ").encode("abc"), ValueError,
     r"character 'c' at position 2 of text is not in the vocabulary"),
    ("encode not a str", lambda: tokenizer.Vocab("ab ").encode(5), TypeError, r"text must be str, got int"),
    ("encode errors mode", lambda: tokenizer.Vocab("ab ").encode("ab", errors="ignore"), ValueError, r"errors must be 'strict' or 'replace'"),
    ("decode id out of range", lambda: tokenizer.Vocab("ab ").decode([1, 99]), ValueError, r"id 99 is out of range for a vocabulary of size 7"),
    ("pad_batch too long", lambda: tokenizer.pad_batch([[1, 2, 3]], pad_to=2), ValueError, r"a sequence is longer than pad_to=2"),
    ("vocab JSON", lambda: tokenizer.Vocab.from_json({"x": 1}), ValueError, r"vocabulary JSON must be an object with a 'chars' string"),
    # ---- exact enumeration
    ("enumerate V < 2", lambda: exact.enumerate_responses(1, 3), ValueError, r"need V >= 2 and max_len >= 1, got V=1"),
    ("enumerate too many", lambda: exact.enumerate_responses(20, 6), ValueError, r"enumeration is limited to 100000"),
]
# every choice of the table of conventions rejects a name it does not know, listing what it allows
CASES += [(f"{sw.name} unknown", lambda sw=sw: Cfg(**{sw.name: "no-such-value"}), ValueError,
           re.escape(f"{sw.name} must be one of {sorted(sw.values)}, got 'no-such-value'"))
          for sw in conventions.SWITCHES if sw.is_choice]


@pytest.mark.parametrize("fn,exc,msg", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_rejected_with_a_message_naming_it(fn, exc, msg):
    with pytest.raises(exc, match=msg):
        fn()


def test_case_ids_are_unique():
    ids = [c[0] for c in CASES]
    assert len(ids) == len(set(ids))


def test_the_good_input_of_these_cases_is_accepted():
    """The baseline every case perturbs is valid, so each case fails for the reason it names."""
    reinforce.loss_and_grad(P, TOK, MASK, PL, R, ref_params=REF)
    rollout.rollout(P, TOK, PL, U)
    reward_model.bt_loss_and_grad(RM, TOK, MASK, TOK, MASK, margin=np.zeros(2))
    sft.loss_and_grad(P, TOK, MASK)
    lstm.backward(np.zeros((2, 4, H)), lcache(), dh_final=np.zeros((2, H)), dc_final=np.zeros((2, H)))
    model.backward(cache(), dscores=np.zeros((2, 4, V)), dvalues=np.zeros((2, 4)))
    policy.grad_logprob(Z, np.zeros(3, int), np.ones(3))
    policy.sample(policy.logprobs(Z), np.array([0.0, 0.5, 0.99]))
    optim.sgd_step(dict(P), G0, 0.1)
    optim.clip_grad_norm(G0, 1.0)
    # integer and 0-d array coefficients are real numbers too
    Cfg(alpha=2, gamma=np.float64(0.9), beta=np.array(0.1))


def test_padding_ids_are_never_read():
    """Out-of-range ids on padding positions are not errors (docs/conventions.md §2: padded ids are never read)."""
    garbage = np.where(MASK > 0, TOK, 12345)
    o1, g1 = reinforce.loss_and_grad(P, TOK, MASK, PL, R, ref_params=REF)
    o2, g2 = reinforce.loss_and_grad(P, garbage, MASK, PL, R, ref_params=REF)
    assert o1["loss"] == o2["loss"] and all(np.array_equal(g1[k], g2[k]) for k in P)
    assert sft.loss_and_grad(P, garbage, MASK)[0]["loss"] == sft.loss_and_grad(P, TOK, MASK)[0]["loss"]
    assert np.array_equal(reward_model.forward(RM, garbage, MASK)[0], reward_model.forward(RM, TOK, MASK)[0])


def test_nonfinite_params_of_the_reward_model_and_sft():
    for name, f in (("sft", lambda q: sft.loss_and_grad(q, TOK, MASK)),
                    ("rm", lambda q: reward_model.forward(q, TOK, MASK))):
        base = P if name == "sft" else RM
        for bad in (np.nan, np.inf, -np.inf):
            q = {**base, "embedding.weight": np.full((V, E), bad)}
            with pytest.raises(ValueError, match=r"params\['embedding.weight'\] must be finite"):
                f(q)
