"""evaluation: the judge of every representation.

* :func:`knn` -- exact k-NN search (FAISS GPU/CPU, blockwise torch fallback), approximate
  (:mod:`evaluation.ann`: FAISS IVF-Flat / IVF-PQ / HNSW) for large galleries (``index=``);
* :func:`retrieval_metrics` -- Recall@K, Precision@1, R-Precision, MAP@R;
* :class:`AccuracyCalculator` -- pytorch-metric-learning's ``AccuracyCalculator`` interface
  (same options, keys and values) over the same search;
* :func:`clustering_metrics` -- NMI / AMI of k-means on the embeddings;
* :func:`linear_probe` and :func:`knn_classifier` -- classification on frozen embeddings;
* :mod:`evaluation.known_mi` -- correlated Gaussians with a known MI and their optimal critic
  (Poole et al. 2019), the data of the known-MI benchmark (:mod:`contrastive.mi_benchmark`).

Nothing here imports a loss: ``evaluation`` sits above the core and beside ``losses``
(``docs/architecture.md``).
"""

from . import known_mi
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
    "known_mi",
]
