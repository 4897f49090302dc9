"""Adapters that run other libraries' models and sampler calls through fastdiff.

- :mod:`fastdiff.adapters.k_diffusion`: a k-diffusion denoiser ``D(x, sigma, **extra)`` as a fastdiff
  model, and fastdiff's methods behind k-diffusion's sampler signature.
"""
