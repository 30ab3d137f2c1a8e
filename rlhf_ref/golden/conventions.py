"""The one place where the verifier reads the reference's conventions: the allowed values of each
switch and the reference functions that compute each quantity. Every candidate list of
rlhf_ref.golden.mistakes comes from here, and those lists are read from the reference's table of conventions
(rlhf_ref/conventions.py), so that a new estimator, baseline or aggregation shows up in the
verifier's candidates without an edit there.
"""

from __future__ import annotations

from .. import conventions as _table
from .. import reinforce
from .. import returns as _ret

KL_ESTIMATORS = _table.values("kl")
RETURNS = _table.values("returns")
BASELINES = _table.values("baseline")
WHITEN = _table.values("whiten")
WHITEN_EPS = _ret.WHITEN_EPS
AGGREGATIONS = _table.values("aggregation")

kl_estimate = _ret.kl_estimate
kl_estimate_grad = _ret.kl_estimate_grad

kl_per_token = _ret.kl_per_token
shaped_rewards = _ret.shaped_rewards
discounted_returns = _ret.discounted_returns
baseline = _ret.baseline
whiten = _ret.whiten
last_action_index = _ret.last_action_index
aggregation_weights = reinforce.aggregation_weights
