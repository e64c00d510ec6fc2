"""What functionally invariant paths are for: continual learning, sparsification, robust ensembles.

Each application runs its baselines in the same run and budget and writes a JSON
record and PNG plots.
"""

from . import attacks as attacks
from . import classifiers as classifiers
from . import continual as continual
from . import robust_ensemble as robust_ensemble
from . import sparsify as sparsify
