"""fastdiff: fast sampling and training for diffusion and flow-matching models.

Fused CUDA, Triton and C++ kernels behind pure-PyTorch reference ops. Conventions: flow time t from
0 (noise) to 1 (data), x_t = alpha_t z + beta_t eps (see the README and docs/).
"""

from fastdiff import _native
from fastdiff._version import __version__

_native.load()

from fastdiff import ops, paths  # noqa: E402
from fastdiff.sampling import Sampler, bits_per_dim, invert, langevin, log_likelihood, sample  # noqa: E402
from fastdiff.generation import generate, load_generated  # noqa: E402
from fastdiff.sampling.cfg_parallel import cfg_parallel  # noqa: E402
from fastdiff.sampling.core.graphs import clear_cuda_graphs  # noqa: E402
from fastdiff.sampling.sampler import clear_scratch  # noqa: E402
from fastdiff.dispatch import BackendUnavailable, backends, use_backend  # noqa: E402

__all__ = ["BackendUnavailable", "Sampler", "backends", "bits_per_dim", "cfg_parallel", "clear_cuda_graphs",
           "clear_scratch", "generate", "invert", "langevin", "load_generated", "log_likelihood", "ops", "paths",
           "sample", "use_backend", "__version__"]
