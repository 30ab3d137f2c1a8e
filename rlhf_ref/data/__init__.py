"""The embedded default data: the grammar corpus and its prompts (see ``corpus``)."""

from .corpus import (CHARS, CORPUS_LINES, CORPUS_SEED, LEXICON, N_HELDOUT, SPLIT_SEED, VALENCE,
                     PromptSplit, default_split, default_vocab, generate_corpus, load_corpus, parse,
                     prompt_pairs, sentiment_class, split_line, split_prompts)

__all__ = ["CHARS", "CORPUS_LINES", "CORPUS_SEED", "LEXICON", "N_HELDOUT", "SPLIT_SEED", "VALENCE",
           "PromptSplit", "default_split", "default_vocab", "generate_corpus", "load_corpus", "parse",
           "prompt_pairs", "sentiment_class", "split_line", "split_prompts"]
