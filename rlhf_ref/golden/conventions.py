"""The one place where the verifier reads the reference's conventions: the allowed values of each
switch and the reference functions that compute each quantity. Every candidate list of
rlhf_ref.golden.mistakes comes from here, so that a new estimator, baseline or aggregation in
the reference shows up in the verifier's candidates without an edit there. (When the reference
gets one table of conventions, these names are read from it instead: this module changes, the
catalogue does not.)
"""

from __future__ import annotations

from .. import reinforce
from .. import returns as _ret

KL_ESTIMATORS = _ret.KL_ESTIMATORS         #: ("k1", "k2", "k3")
RETURNS = _ret.RETURNS                     #: ("rtg", "total")
BASELINES = _ret.BASELINES                 #: ("value", "qvalue", "mean", "loo", "none")
WHITEN = _ret.WHITEN                       #: ("off", "population", "bessel")
WHITEN_EPS = _ret.WHITEN_EPS
AGGREGATIONS = reinforce.AGGREGATIONS      #: ("token_mean", "seq_mean", "seq_sum")

kl_per_token = _ret.kl_per_token
shaped_rewards = _ret.shaped_rewards
discounted_returns = _ret.discounted_returns
baseline = _ret.baseline
whiten = _ret.whiten
last_action_index = _ret.last_action_index
aggregation_weights = reinforce.aggregation_weights
