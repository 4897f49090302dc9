"""fastdiff's fused ops. Each op checks its arguments once, then runs the kernel of the backend in force
(fastdiff.backends(); the backend records in fastdiff/_backends), and has a pure-PyTorch ``*_reference``
twin: the specification and the test oracle. Each op's fake (meta) kernel and autograd registration sit
under its Python wrapper."""

from fastdiff.ops.diffusion_loss import (add_noise, add_noise_reference, diffusion_loss,
                                         diffusion_loss_backward_reference, diffusion_loss_reference,
                                         diffusion_loss_residual_reference)
from fastdiff.ops.guided_step import guided_step, guided_step_reference
from fastdiff.ops.philox import philox4x32_10, philox4x32_10_reference
from fastdiff.ops.randn import randn, randn_reference
from fastdiff.ops.sample_gram import sample_gram, sample_gram_reference
from fastdiff.ops.sampler_step import sampler_step, sampler_step_reference

__all__ = ["add_noise", "add_noise_reference", "diffusion_loss", "diffusion_loss_backward_reference",
           "diffusion_loss_reference", "diffusion_loss_residual_reference", "guided_step", "guided_step_reference",
           "philox4x32_10", "philox4x32_10_reference", "randn", "randn_reference", "sample_gram",
           "sample_gram_reference", "sampler_step", "sampler_step_reference"]
