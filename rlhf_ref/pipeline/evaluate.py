"""Stage 4 — evaluation of the fine-tuned policy against π_ref on held-out prompts.

For every held-out prompt, one response from π_ref ("before") and one from the fine-tuned policy
("after"), sampled with the training α and ε from the evaluation generator. Reported:

- ``true_win_rate``: share of prompts where the hidden true preference ranks "after" above
  "before", ties counting half (the simulated annotator's noise-free judgement);
- ``true_reward_before`` / ``true_reward_after``: mean true reward of each policy's responses;
- ``kl_per_sequence``: Σ_t (log π(a_t|s_t) − log π_ref(a_t|s_t)) over the "after" responses,
  averaged over prompts — the k1 estimate of KL(π‖π_ref) per sequence, unbiased;
- the **style** measures: ``ref_loglik_per_token_after``, the mean log-likelihood per response
  token of the fine-tuned policy's responses under π_ref, beside ``ref_loglik_per_token_before``,
  that of π_ref's own samples (minus its entropy rate): a small drop means the fine-tuned text is
  still text π_ref would write; and ``corpus_word_rate_*``, the share of response words that
  occur in the corpus (invented words, runs of letters, broken spacing lower it); and, when the
  corpus has a grammar, ``wellformed_rate_*``, the share of texts it can generate.
"""

from __future__ import annotations

import re

import numpy as np

from . import common

_WORD = re.compile(r"[A-Za-z']+")


def corpus_words(texts):
    """The set of lower-cased words of a corpus."""
    return {w.lower() for t in texts for w in _WORD.findall(t)}


def word_rate(responses, words):
    """Share of the words in ``responses`` that are in ``words`` (1.0 when there are none)."""
    total = hit = 0
    for r in responses:
        for w in _WORD.findall(r):
            total += 1
            hit += w.lower() in words
    return hit / total if total else 1.0


def evaluate(backend, policy_params, ref_params, vocab, prompts, rng, *, max_new=40, alpha=1.0, eps=0.0,
             true_reward=None, true_win=None, words=None, reward=None, wellformed=None):
    """Compare the fine-tuned policy with π_ref on ``prompts``; returns (metrics dict, samples dict).

    true_reward(prompts, responses) -> (B,) and true_win(prompts, a, b) -> (B,) in {0, ½, 1}
    come from the simulated annotator; reward(prompts, responses) is the learned reward (optional);
    wellformed(prompt, response) -> bool says whether a text is in the corpus's grammar (optional).
    """
    be = common.resolve_backend(backend)
    ref = common.policy_part(ref_params)
    pol = common.policy_part(policy_params)
    before = common.generate(be, ref, vocab, prompts, rng, max_new, alpha, eps, ref_params=ref)
    after = common.generate(be, pol, vocab, prompts, rng, max_new, alpha, eps, ref_params=ref)
    n = len(prompts)
    m = {"n_prompts": n}

    def per_token(ro):
        am = ro["action_mask"] > 0
        return float(np.sum(np.where(am, ro["ref_logp"], 0.0)) / max(am.sum(), 1))

    am = after["action_mask"] > 0
    m["kl_per_sequence"] = float(np.sum(np.where(am, after["logp"] - after["ref_logp"], 0.0)) / n)
    m["ref_loglik_per_token_before"] = per_token(before)
    m["ref_loglik_per_token_after"] = per_token(after)
    m["ref_loglik_per_sequence_before"] = float(np.sum(before["ref_logp"]) / n)
    m["ref_loglik_per_sequence_after"] = float(np.sum(after["ref_logp"]) / n)
    m["response_len_before"] = float(np.sum(before["action_mask"]) / n)
    m["response_len_after"] = float(np.sum(after["action_mask"]) / n)
    m["eos_rate_before"] = float(np.mean(before["eos"]))
    m["eos_rate_after"] = float(np.mean(after["eos"]))
    if words is not None:
        m["corpus_word_rate_before"] = word_rate(before["responses"], words)
        m["corpus_word_rate_after"] = word_rate(after["responses"], words)
    if wellformed is not None:
        for name, ro in (("before", before), ("after", after)):
            m[f"wellformed_rate_{name}"] = float(np.mean([bool(wellformed(p, r)) for p, r in
                                                          zip(prompts, ro["responses"])]))
    if true_reward is not None:
        m["true_reward_before"] = float(np.mean(true_reward(prompts, before["responses"])))
        m["true_reward_after"] = float(np.mean(true_reward(prompts, after["responses"])))
    if true_win is not None:
        w = np.asarray(true_win(prompts, after["responses"], before["responses"]), dtype=np.float64)
        m["true_win_rate"] = float(w.mean())
    if reward is not None:
        m["rm_reward_before"] = float(np.mean(reward(prompts, before["responses"])))
        m["rm_reward_after"] = float(np.mean(reward(prompts, after["responses"])))
    samples = {"prompts": list(prompts), "before": before["responses"], "after": after["responses"]}
    return m, samples
