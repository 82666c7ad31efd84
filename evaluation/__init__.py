"""evaluation: the judge of every representation.

* :func:`knn` -- exact k-NN search (FAISS GPU/CPU, blockwise torch fallback), approximate
  (:mod:`evaluation.ann`: FAISS IVF-Flat / IVF-PQ / HNSW) for large galleries (``index=``);
  its pieces: :mod:`evaluation.backends` (the :class:`KnnBackend` protocol and its
  implementations), :mod:`evaluation.ties` (:class:`ExactTies`: exact ties and duplicate rows
  over any backend), :mod:`evaluation.pml_interop` (:class:`KnnFunc` / :class:`PmlBackend`:
  pytorch-metric-learning ``knn_func`` both ways) and :mod:`evaluation.search` (blocks, threads);
* :func:`retrieval_metrics` -- Recall@K, Precision@1, R-Precision, MAP@R;
* :class:`AccuracyCalculator` -- pytorch-metric-learning's ``AccuracyCalculator`` interface
  (same options, keys and values) over the same search;
* :func:`clustering_metrics` -- NMI / AMI of k-means on the embeddings;
* :func:`linear_probe` and :func:`knn_classifier` -- classification on frozen embeddings;
* :mod:`evaluation.known_mi` -- correlated Gaussians with a known MI and their optimal critic
  (Poole et al. 2019), the data of the known-MI benchmark (:mod:`contrastive.app.mi_benchmark`).

Nothing here imports a loss: ``evaluation`` sits above the core and beside ``losses``
(``docs/architecture.md``).
"""

from . import known_mi
from .accuracy_calculator import AccuracyCalculator
from .backends import KnnBackend
from .clustering import clustering_metrics
from .pml_interop import KnnFunc, PmlBackend
from .probe import linear_probe
from .retrieval import retrieval_metrics
from .search import knn
from .ties import ExactTies
from .weighted_knn import knn_classifier

__all__ = [
    "knn",
    "retrieval_metrics",
    "AccuracyCalculator",
    "clustering_metrics",
    "knn_classifier",
    "linear_probe",
    "known_mi",
    "KnnBackend",
    "ExactTies",
    "KnnFunc",
    "PmlBackend",
]
