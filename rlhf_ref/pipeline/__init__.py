"""The RLHF pipeline, one module per stage: pretrain → preferences and reward model → REINFORCE → evaluate.

    from rlhf_ref.pipeline import PretrainConfig, pretrain, RewardConfig, collect_preferences, \\
        train_reward_model, RLConfig, reinforce_finetune, evaluate

Each stage takes a config dataclass (one documented field per hyperparameter), a backend
(a name for ``rlhf_ref.backends.get`` or a backend module) and an optional run folder, where it
writes ``metrics/<stage>.jsonl`` and ``checkpoints/<stage>.npz`` (+ JSON manifest) and from which
it resumes. All heavy compute goes through the backend interface (docs/internals.md).
``rlhf_ref.demo`` strings the stages together.
"""

from .pretrain import PretrainConfig, pretrain
from .reward import RewardConfig, collect_preferences, split_pairs, train_reward_model, pair_accuracy
from .rl import RLConfig, reinforce_finetune, RewardModelReward
from .evaluate import evaluate, corpus_words, word_rate
from . import common

__all__ = ["PretrainConfig", "pretrain", "RewardConfig", "collect_preferences", "split_pairs",
           "train_reward_model", "pair_accuracy", "RLConfig", "reinforce_finetune", "RewardModelReward",
           "evaluate", "corpus_words", "word_rate", "common"]
