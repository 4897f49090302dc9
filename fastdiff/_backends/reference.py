"""The reference backend: each op's pure-PyTorch specification (registered by the op modules in
fastdiff/ops), on any device; "auto" falls back to it where no kernel runs."""

from fastdiff._backends.registry import Backend, BackendStatus, register_backend

register_backend(Backend("reference", status=lambda device_type=None, index=None: BackendStatus(
    True, "pure PyTorch, any device")))
