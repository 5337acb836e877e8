"""Demo models and data for the main job: all built from configs and data shipped with Python or packages."""

from attnmonitor.demo.corpus import CorpusDataModule, WordVocabulary, load_corpus_words
from attnmonitor.demo.gpt import TinyGPT
from attnmonitor.demo.minilm import MiniLMClassifier, WordOrderDataModule
from attnmonitor.demo.reverse import ReversalDataModule, ReversalModel

__all__ = [
    "CorpusDataModule",
    "MiniLMClassifier",
    "ReversalDataModule",
    "ReversalModel",
    "TinyGPT",
    "WordOrderDataModule",
    "WordVocabulary",
    "load_corpus_words",
]
