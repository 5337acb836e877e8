"""The demo used by the main job: a small GPT and a corpus embedded in Python's standard library."""

from attnmonitor.demo.corpus import CorpusDataModule, WordVocabulary, load_corpus_words
from attnmonitor.demo.gpt import TinyGPT

__all__ = ["CorpusDataModule", "TinyGPT", "WordVocabulary", "load_corpus_words"]
