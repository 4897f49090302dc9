"""The ``fastdiff`` command line."""

from __future__ import annotations

import argparse
import platform
import sys


def _info(args: argparse.Namespace) -> int:
    import torch

    import fastdiff
    from fastdiff import _native

    print(f"fastdiff   {fastdiff.__version__}")
    print(f"python     {platform.python_version()} ({sys.executable})")
    print(f"torch      {torch.__version__} (CUDA {torch.version.cuda or 'none'})")
    try:
        import triton

        print(f"triton     {triton.__version__}")
    except ImportError:
        print("triton     not installed")
    build = _native.status.build
    if _native.status.loaded:
        extras = ", ".join(f"{k}={v}" for k, v in build.items())
        print(f"extension  {_native.status.path or 'JIT'} ({extras})")
    else:
        print(f"extension  not loaded: {_native.status.reason}")
    print(f"cpu        {platform.machine()}, {torch.get_num_threads()} threads")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            print(f"cuda:{i}     {p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB")
    else:
        print("cuda       no device visible")
    print("backends:")
    for name, st in fastdiff.backends().items():
        print(f"  {name:10s} {'yes' if st.available else 'no '}  {st.reason}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastdiff", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_info = sub.add_parser("info", help="print versions, devices and available backends")
    p_info.set_defaults(func=_info)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
