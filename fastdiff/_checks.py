"""Argument validation shared by the public ops: errors name the offending argument."""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Sequence

import torch

_U64 = 1 << 64
_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
# dtypes a model's prediction may have: the kernels read them and compute in float32
PRED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def seeds_tensor(seeds, device: torch.device | None = None, name: str = "seeds") -> torch.Tensor:
    """Per-sample 64-bit seeds as a 1-D int64 tensor (seeds >= 2^63 in two's complement).

    ``seeds``: a sequence of ints in [0, 2^64) or a 1-D int64 tensor (whose negative entries are
    read as the two's complement of seeds >= 2^63).
    """
    if isinstance(seeds, torch.Tensor):
        if seeds.dtype != torch.int64:
            raise TypeError(f"{name} must be an int64 tensor or a list of ints, got a {seeds.dtype} tensor")
        if seeds.dim() != 1:
            raise ValueError(f"{name} must be 1-D (one seed per sample), got shape {tuple(seeds.shape)}")
        return seeds if device is None else seeds.to(device)
    if _is_int(seeds):
        raise TypeError(f"{name} must be a sequence of ints (one per sample) or an int64 tensor, got the int "
                        f"{seeds}; write [{seeds}] for one sample")
    if not isinstance(seeds, Sequence) or isinstance(seeds, (str, bytes)):
        raise TypeError(f"{name} must be a sequence of ints or an int64 tensor, got {type(seeds).__name__}")
    values = []
    for i, s in enumerate(seeds):
        if not _is_int(s):
            raise TypeError(f"{name}[{i}] must be an int, got {type(s).__name__} {s!r}")
        s = int(s)
        if s < 0 or s >= _U64:
            raise ValueError(f"{name}[{i}] = {s} is out of range: seeds must be in [0, 2^64)")
        values.append(s - _U64 if s >= 1 << 63 else s)
    return torch.tensor(values, dtype=torch.int64, device=device)


def seeds_to_ints(seeds: torch.Tensor) -> list[int]:
    """The unsigned 64-bit seeds of an int64 seed tensor (host copy)."""
    return [int(s) % _U64 for s in seeds.tolist()]


def stream_id(stream, name: str = "stream") -> int:
    if not _is_int(stream):
        raise TypeError(f"{name} must be an int in [0, 2^32), got {type(stream).__name__} {stream!r}")
    stream = int(stream)
    if not 0 <= stream < 1 << 32:
        raise ValueError(f"{name} = {stream} is out of range: stream ids are in [0, 2^32)")
    return stream


def shape_tuple(shape, name: str = "shape") -> tuple[int, ...]:
    if _is_int(shape):
        shape = (shape,)
    if isinstance(shape, torch.Size):
        shape = tuple(shape)
    if not isinstance(shape, Sequence) or isinstance(shape, (str, bytes)):
        raise TypeError(f"{name} must be an int or a sequence of ints, got {type(shape).__name__}")
    out = []
    for i, d in enumerate(shape):
        if not _is_int(d):
            raise TypeError(f"{name}[{i}] must be an int, got {type(d).__name__} {d!r}")
        if d < 0:
            raise ValueError(f"{name}[{i}] = {d} is negative")
        out.append(int(d))
    if math.prod(out) >= 1 << 62:  # beyond int64 element counts: torch would fail unpacking, naming neither
        raise ValueError(f"{name} = {tuple(out)} has {math.prod(out)} elements, more than any tensor can hold")
    return tuple(out)


def float_dtype(dtype, name: str = "dtype") -> torch.dtype:
    if dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be one of float32, float64, float16, bfloat16; got {dtype}")
    return dtype


def offset_value(offset, name: str = "offset") -> int:
    if not _is_int(offset):
        raise TypeError(f"{name} must be an int, got {type(offset).__name__} {offset!r}")
    if offset < 0 or offset >= 1 << 62:
        raise ValueError(f"{name} = {offset} is out of range [0, 2^62)")
    return int(offset)


def numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


FLOAT32_MAX = 3.4028234663852886e38


def finite_real(name, c) -> float:
    """A finite real number as a float (coefficients of the fused step)."""
    if type(c) is float and -FLOAT32_MAX <= c <= FLOAT32_MAX:  # the common case first (runs for every coefficient)
        return c
    # float() would also take '1', True or a 1-element tensor (a host sync): only real numbers pass
    if isinstance(c, bool) or not isinstance(c, numbers.Real):
        raise TypeError(f"{name} must be a real number (int or float), got {type(c).__name__} {c!r}")
    c = float(c)
    if not math.isfinite(c):
        raise ValueError(f"{name} must be finite, got {c}")
    if abs(c) > FLOAT32_MAX:
        raise ValueError(f"{name} = {c:g} is beyond float32's range (the kernels compute in float32: it would be inf)")
    return c


def flag(name, value) -> bool:
    """A bool argument: True or False (numpy's bool_ too); anything else is an error naming the argument.

    ``bool('no')`` is True, so truthiness would turn a misspelt "no"/"false" into the opposite setting.
    """
    if isinstance(value, bool):
        return value
    if type(value).__module__ == "numpy" and type(value).__name__ in ("bool", "bool_"):  # numpy.bool_
        return bool(value)
    raise TypeError(f"{name} must be True or False, got {type(value).__name__} {value!r}")


def optional_flag(name, value) -> bool | None:
    """A bool argument whose None means "decide for me" (e.g. cfg_batch)."""
    return None if value is None else flag(name, value)


def real(name, value, *, lo: float | None = None, hi: float | None = None, lo_open: bool = False,
         hi_open: bool = False) -> float:
    """A finite real number (int or float, not bool, not a string) in an optional range, as a float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number (int or float), got {type(value).__name__} {value!r}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {v}")
    if lo is not None and (v <= lo if lo_open else v < lo):
        raise ValueError(f"{name} must be {'>' if lo_open else '>='} {lo}, got {v}")
    if hi is not None and (v >= hi if hi_open else v > hi):
        raise ValueError(f"{name} must be {'<' if hi_open else '<='} {hi}, got {v}")
    return v


def count(name, value, *, least: int = 0, most: int | None = None) -> int:
    """An int (not bool, not float, not a string) in [least, most]."""
    if not _is_int(value):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    v = int(value)
    if v < least or (most is not None and v > most):
        bound = f"in [{least}, {most}]" if most is not None else f">= {least}"
        raise ValueError(f"{name} must be {bound}, got {v}")
    return v


def device_arg(name, value) -> torch.device:
    """A device the kernels can run on: cpu, or cuda when this torch has CUDA and that GPU exists.

    torch.device('cuda') without CUDA fails later inside torch with an AssertionError naming neither the
    argument nor the cause; 'meta' and other types reach the kernels' overlap checks.
    """
    if isinstance(value, str):
        try:
            value = torch.device(value)
        except RuntimeError as e:
            raise ValueError(f"{name} = {value!r} is not a device: {e}") from None
    if not isinstance(value, torch.device):
        raise TypeError(f"{name} must be a torch.device or a string such as 'cpu' or 'cuda:0', "
                        f"got {type(value).__name__} {value!r}")
    if value.type == "cpu":  # cpu:N is the one host device: without the index, tensors' devices compare equal
        return torch.device("cpu")
    if value.type != "cuda":
        raise ValueError(f"{name} = '{value}': fastdiff runs on cpu or cuda devices, not {value.type}")
    if not torch.cuda.is_available():
        raise ValueError(f"{name} = '{value}', but CUDA is not available here "
                         f"(torch {torch.__version__}, {'no CUDA build' if torch.version.cuda is None else 'no GPU'})")
    if value.index is not None and value.index >= torch.cuda.device_count():
        raise ValueError(f"{name} = '{value}', but there {'is' if torch.cuda.device_count() == 1 else 'are'} "
                         f"only {torch.cuda.device_count()} CUDA device(s)")
    return value


def available_bytes(device: torch.device) -> int | None:
    """Free memory where tensors of ``device`` live: the GPU's free memory, or the host's MemAvailable (Linux);
    None where it cannot be read."""
    if device.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(device)[0])
        except (RuntimeError, AssertionError):
            return None
    free = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    free = int(line.split()[1]) * 1024
    except OSError:
        pass
    if free is None:
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    return min([free, *_process_limits()])


def _process_limits() -> list[int]:
    """What this process may still take under its own limits: the address space (ulimit -v) less what it maps, and
    its cgroup's memory.max less memory.current (a container's limit). Empty where there is none or it is unread."""
    out = []
    try:
        import resource

        limit = resource.getrlimit(resource.RLIMIT_AS)[0]
        if limit != resource.RLIM_INFINITY:
            with open("/proc/self/statm") as f:
                mapped = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
            out.append(max(limit - mapped, 0))
    except (ImportError, OSError, ValueError):
        pass
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            cap = f.read().strip()
        if cap != "max":
            with open("/sys/fs/cgroup/memory.current") as f:
                out.append(max(int(cap) - int(f.read().strip()), 0))
    except (OSError, ValueError):
        pass
    return out


def check_memory(what: str, nbytes: int, device: torch.device) -> None:
    """Refuse a request whose tensors cannot fit: a ValueError naming ``what`` (the arguments that set the size).

    On Linux the host overcommits, so an allocation beyond RAM succeeds and the process is killed when it
    is touched (the OOM killer: no error, no traceback); asking first turns that into an error naming the
    argument. Only requests above the free memory are refused, so a tight but possible run still runs."""
    if nbytes < 1 << 28:  # small requests skip the free-memory read (a /proc read or a CUDA query per call)
        return
    free = available_bytes(device)
    if free is not None and nbytes > free:
        raise ValueError(f"{what} need {nbytes / 2**30:.3g} GiB on {device}, more than the {free / 2**30:.3g} GiB "
                         f"free there")
