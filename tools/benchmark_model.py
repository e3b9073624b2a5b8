"""Deprecated: the whole-model benchmark is :mod:`dinov2od.benchmark` (``model``, ``models``,
``measure``, ``targets``); ``tools/benchmark.py --section model`` runs it. This module re-exports
its names for old imports (``from benchmark_model import PLAIN_PRESETS``) and warns once."""
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dinov2od.benchmark.measure import *  # noqa: E402,F401,F403
from dinov2od.benchmark.measure import CLOCK, STAT, _sync  # noqa: E402,F401
from dinov2od.benchmark.model import *  # noqa: E402,F401,F403
from dinov2od.benchmark.models import *  # noqa: E402,F401,F403
from dinov2od.benchmark.models import ROOT, _backbone  # noqa: E402,F401
from dinov2od.benchmark.targets import *  # noqa: E402,F401,F403

warnings.warn("tools/benchmark_model.py is deprecated: import dinov2od.benchmark (model, models, measure, "
              "targets) instead", DeprecationWarning, stacklevel=2)
