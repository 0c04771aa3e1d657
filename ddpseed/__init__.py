"""ddpseed: one call makes every rank of a PyTorch DDP job agree on its seeds.

>>> import ddpseed
>>> plan = ddpseed.setup(seed=1234)                      # doctest: +SKIP
>>> loader = plan.dataloader(dataset, batch_size=32, num_workers=4)   # doctest: +SKIP
"""

from .derivation import (
    SeedTable,
    process_seed,
    sample_seed,
    seed_table,
    validate_seed,
    worker_info_seed,
    worker_seed,
)
from .errors import (
    AgreementError,
    ArgumentError,
    CoordinationError,
    DDPSeedError,
    RunDirError,
    SeedMismatchError,
    SeedValueError,
    StateError,
    TopologyError,
)
from .loader import SeededDataLoader
from .mesh import MeshSpec
from .plan import SeedPlan
from .sampler import SeededDistributedSampler
from .scalable import ScalableDistributedSampler
from .startup import setup
from .state import load_state, save_state
from .topology import Topology, detect
from .workers import WorkerInitFn

__version__ = "0.1.0"

__all__ = [
    "AgreementError",
    "ArgumentError",
    "CoordinationError",
    "DDPSeedError",
    "MeshSpec",
    "RunDirError",
    "ScalableDistributedSampler",
    "SeedMismatchError",
    "SeedPlan",
    "SeedTable",
    "SeedValueError",
    "SeededDataLoader",
    "SeededDistributedSampler",
    "StateError",
    "Topology",
    "TopologyError",
    "WorkerInitFn",
    "__version__",
    "detect",
    "load_state",
    "process_seed",
    "sample_seed",
    "save_state",
    "seed_table",
    "setup",
    "validate_seed",
    "worker_info_seed",
    "worker_seed",
]
