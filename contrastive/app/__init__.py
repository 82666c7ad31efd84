"""The application layer: what a user runs, built from the core (``contrastive``), ``losses`` and
``evaluation`` and imported by nothing below it (``docs/architecture.md``).

=====================  ========================================================================
module                 owns
=====================  ========================================================================
``config``             typed settings of a run / a comparison (pydantic), config files
``factory``            builders: loss (+ sized critic), embedder, transforms, optimiser, schedule
``protocol``           the evaluation protocol: which sets, class-disjoint splits, the metrics
``run_folder``         a run folder's rules (resume / overwrite / signals) and its log files
``train``              the training loop, :func:`fit`
``compare``            the side-by-side comparison of losses (cached cells)
``tuning``             the fair protocol: equal Optuna TPE budget per loss on class-disjoint folds
``statistics``         95% t-intervals over seeds, paired tests against the best loss
``compare_report``     the comparison's tables (mean +- std, 95% CI), JSON / CSV / Markdown
``compare_plots``      its PNG plots
``mi_benchmark``       the known-MI benchmark run (critics trained on a staircase of MI)
``mi_family``          the same for the whole estimator family (``mi-bench --family``)
``reproduce``          the experiments of Tschannen et al. (2020) and their page
``results``            the helpers every report shares: Markdown tables, mean +- std cells
=====================  ========================================================================
"""

from __future__ import annotations

from .compare import CompareConfig, compare
from .compare_report import aggregate, format_table, write_report
from .config import ConfigError, TrainConfig
from .run_folder import TrainingInterrupted
from .train import DivergedError, fit

__all__ = ["CompareConfig", "compare", "aggregate", "format_table", "write_report",
           "ConfigError", "TrainConfig", "TrainingInterrupted", "DivergedError", "fit"]
