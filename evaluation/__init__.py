"""evaluation: the judge of every representation.

* :func:`knn` -- exact k-NN search (FAISS GPU/CPU, blockwise torch fallback), approximate
  (:mod:`evaluation.ann`: FAISS IVF-Flat / IVF-PQ / HNSW) for large galleries (``index=``);
* :func:`retrieval_metrics` -- Recall@K, Precision@1, R-Precision, MAP@R;
* :class:`AccuracyCalculator` -- pytorch-metric-learning's ``AccuracyCalculator`` interface
  (same options, keys and values) over the same search;
* :func:`clustering_metrics` -- NMI / AMI of k-means on the embeddings;
* :func:`linear_probe` and :func:`knn_classifier` -- classification on frozen embeddings;
* :mod:`evaluation.mi_benchmark` -- the known-MI estimator benchmark (Poole et al. 2019).

Nothing here imports a loss (the MI benchmark takes its estimators as arguments, see there).
"""

from . import mi_benchmark
from .accuracy_calculator import AccuracyCalculator
from .clustering import clustering_metrics
from .probe import linear_probe
from .retrieval import retrieval_metrics
from .search import knn
from .weighted_knn import knn_classifier

__all__ = [
    "knn",
    "retrieval_metrics",
    "AccuracyCalculator",
    "clustering_metrics",
    "knn_classifier",
    "linear_probe",
    "mi_benchmark",
]
