"""evaluation: the judge of every representation.

* :func:`knn` -- exact k-NN search (FAISS GPU/CPU, blockwise torch fallback);
* :func:`retrieval_metrics` -- Recall@K, Precision@1, R-Precision, MAP@R;
* :func:`clustering_metrics` -- NMI / AMI of k-means on the embeddings;
* :func:`linear_probe` and :func:`knn_classifier` -- classification on frozen embeddings;
* :mod:`evaluation.mi_benchmark` -- the known-MI estimator benchmark (Poole et al. 2019).

Nothing here imports a loss (the MI benchmark takes its estimators as arguments, see there).
"""

from . import mi_benchmark
from .clustering import clustering_metrics
from .probe import linear_probe
from .retrieval import retrieval_metrics
from .search import knn
from .weighted_knn import knn_classifier

__all__ = [
    "knn",
    "retrieval_metrics",
    "clustering_metrics",
    "knn_classifier",
    "linear_probe",
    "mi_benchmark",
]
