"""Problems: a full-batch loss over one flat parameter vector, and its initial point.

Stage 1 of the pipeline (see the README). A :class:`Problem` is what GD runs on and what every flow
differentiates. Its loss is a sum of *parts* (data chunks of at most ``batch_size`` examples,
weighted so that they add up to the full-batch mean), so a large data set never needs one huge
forward pass; the derivatives in :mod:`neuralflow.autodiff` accumulate over the parts.
"""

from __future__ import annotations

from .core import LossFn as LossFn
from .core import Problem, from_function, from_module, quadratic
from .core import check_lr as check_lr
from .core import check_nonnegative_int as check_nonnegative_int
from .core import check_positive_int as check_positive_int
from .digits import cnn_digits, mlp_digits
from .registry import PROBLEMS, from_file, make
from .toys import lstm_recall, scalar_factorization, zhu_quartic

# LossFn and the checks are not in __all__ but the stages above import them from here (``X as X``)

__all__ = [
    "Problem",
    "quadratic",
    "zhu_quartic",
    "scalar_factorization",
    "mlp_digits",
    "cnn_digits",
    "lstm_recall",
    "from_module",
    "from_file",
    "from_function",
    "PROBLEMS",
    "make",
]
