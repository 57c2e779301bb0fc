"""MP-100 data: reading and cleaning, the top-down crop, targets, pairs and episodes."""

from capenext.data.dataset import PairDataset, adjacency, collate, make_item
from capenext.data.episodes import episodes, training_pairs
from capenext.data.mp100 import (
    SPLITS,
    SUBSETS,
    Category,
    DataError,
    Sample,
    Subset,
    annotation_path,
    load_split,
    load_subset,
)

__all__ = [
    "SPLITS", "SUBSETS", "Category", "DataError", "PairDataset", "Sample", "Subset", "adjacency", "collate",
    "annotation_path", "episodes", "load_split", "load_subset", "make_item", "training_pairs",
]
