"""genrec_fast: GenRec generative sequential recommendation with a fast trie-constrained beam search."""
from .config import ModelConfig, Preset, TrainConfig, preset
from .data import (Catalog, DataFormatError, SequenceData, Split, leave_one_out, load_csv, load_movielens, load_p5,
                   load_parquet, synthetic)
from .model import GenRec
from .recommend import Recommendations, Recommender, load, recommend
from .cascade import Cascade
from .hybrid import Hybrid
from .tokenizer import GenRecTokenizer
from .train import train

__version__ = "0.1.0"
__all__ = [
    "Cascade", "Catalog", "DataFormatError", "GenRec", "GenRecTokenizer", "Hybrid", "ModelConfig", "Preset",
    "Recommendations", "Recommender", "SequenceData", "Split", "TrainConfig", "leave_one_out", "load", "load_csv",
    "load_movielens", "load_parquet", "load_p5", "preset", "recommend", "synthetic", "train",
]
