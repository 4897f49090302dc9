"""The ``fastdiff`` command line.

Exit status: 0 success; 2 a usage or input error (bad arguments, a missing, corrupt or incompatible
checkpoint, an unwritable folder, an unavailable backend): ``fastdiff <command>: error: <message>``
on stderr, as argparse does; 1 a runtime failure (training diverged: a non-finite loss; out of memory;
another OS error), with the same one-line message. Anything else is a bug and prints its traceback;
``FASTDIFF_DEBUG=1`` prints the traceback of every error.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import traceback

from fastdiff.cli_sampler import (FLOAT32_MAX, NON_NEGATIVE_INT, POSITIVE_INT, SEED, TRAIN_COUNT, TRAIN_STEPS,
                                  add_sampler_arguments, device_option, float_in, int_in, sample_shape,
                                  sampler_settings)


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


class _Version(argparse.Action):
    """``--version``, looked up only when asked (importlib.metadata, else fastdiff.__version__)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"fastdiff {version()}")
        parser.exit()


def version() -> str:
    try:
        from importlib.metadata import PackageNotFoundError
        from importlib.metadata import version as dist_version

        return dist_version("fastdiff")
    except PackageNotFoundError:  # a source checkout that was never installed
        import fastdiff

        return getattr(fastdiff, "__version__", "unknown")


def _demo(args: argparse.Namespace) -> int:
    from fastdiff.demo.run import run

    metrics = run(args.out, steps=args.steps, batch_size=args.batch_size, seed=args.seed,
                  progress=not args.no_progress)
    return 0 if metrics["generated_accuracy"] else 1


DATASETS = ("digits", "ring")


def _dataset_and_model(name: str, seed: int):
    from fastdiff import mixtures
    from fastdiff.demo import data, models

    if name == "digits":
        from fastdiff.demo.run import digits_model

        return data.digits(), digits_model(data.DIGITS_NUM_CLASSES)
    mixture = mixtures.class_conditional_mixture(num_classes=4, modes_per_class=2, radius=3.0, std=0.3)
    return data.mixture_dataset(mixture, 16384, seed=seed), models.MLP(2, num_classes=4, hidden=128, depth=3)


def _train(args: argparse.Namespace) -> int:
    import torch

    from fastdiff.training import DiffusionObjective, Trainer

    torch.manual_seed(args.seed)
    dataset, model = _dataset_and_model(args.data, args.seed)
    objective = DiffusionObjective(args.path, args.prediction, time_sampling=args.time_sampling,
                                   weighting=args.weighting, snr_gamma=args.snr_gamma,
                                   label_dropout=args.label_dropout, null_y=model.null_label)
    trainer = Trainer(model, dataset, objective=objective, steps=args.steps, batch_size=args.batch_size,
                      lr=args.lr, warmup=args.warmup, lr_schedule=args.lr_schedule, grad_clip=args.grad_clip,
                      ema_decay=args.ema_decay, amp=args.amp, seed=args.seed, out_dir=args.out,
                      checkpoint_every=args.checkpoint_every, keep=args.keep, progress=not args.no_progress,
                      device=args.device, on_nonfinite=args.on_nonfinite, resume=not args.overwrite,
                      overwrite=args.overwrite)
    if trainer.ctx.is_main and trainer.resumed_from is not None:
        print(f"resumed from {trainer.resumed_from} at step {trainer.step}")
    if trainer.step >= args.steps:
        if trainer.ctx.is_main:
            print(f"nothing to do: the run is at step {trainer.step} and --steps is {args.steps} "
                  f"(raise --steps to train further); checkpoints in {trainer.checkpoint_dir}")
    else:
        summary = trainer.fit()
        if trainer.ctx.is_main:
            loss = "n/a" if summary["loss"] is None else f"{summary['loss']:.4f}"
            skipped = f", {len(trainer.skipped)} steps skipped (non-finite)" if trainer.skipped else ""
            print(f"step {summary['step']}: loss {loss}, {summary['steps_per_second'] or 0:.1f} steps/s{skipped}; "
                  f"checkpoints in {trainer.checkpoint_dir}")
    if trainer.ctx.world > 1:
        # the ranks tear down together: one that destroyed its gloo group and exited while rank 0 still wrote
        # was aborted (SIGABRT; seen under load in the torchrun test), and torchrun then killed rank 0
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return 0


def _sample(args: argparse.Namespace) -> int:
    import torch

    import fastdiff
    from fastdiff.demo import images
    from fastdiff.demo.models import load_model

    out = args.out
    if not out.endswith(".safetensors"):
        images.image_format(out, what="--out")  # before sampling: an unknown suffix fails at once
    model, state = load_model(args.checkpoint, ema=not args.no_ema, device=args.device)
    classes = getattr(model, "num_classes", 0)
    if classes:
        y = torch.arange(classes, device=args.device).repeat_interleave(args.per_class)
    else:
        y = None
    config, shape = state["model_config"], sample_shape(state, args.size)
    n = len(y) if y is not None else args.per_class
    with torch.no_grad():
        x = fastdiff.sample(model, shape=shape, y=y, null_y=model.null_label, batch_size=None if y is not None else n,
                            seed=args.seed, progress=not args.no_progress, device=args.device,
                            **sampler_settings(args, state)).cpu()
    if out.endswith(".safetensors"):
        import safetensors.torch as st

        st.save_file({"x": x.contiguous(), **({"y": y.cpu()} if y is not None else {})}, out)
    elif config["type"] == "UNet":
        rows = max(classes, 1)
        grid = x.view(rows, -1, *shape[1:]) if shape[0] == 1 else x[:, 0].view(rows, -1, *shape[1:])
        labels = [str(c) for c in range(classes)] if classes else None
        images.labelled_grid([(f"cfg = {args.cfg:g}", grid)], row_labels=labels, path=out, scale=4,
                             vmin=1.0, vmax=-1.0)
    else:
        _scatter(x, y, out, f"cfg = {args.cfg:g}")
    print(f"wrote {n} samples to {out}")
    return 0


def _scatter(x, y, path: str, title: str) -> None:
    """2-D samples as a density picture (one panel per class), via the grid writer."""
    import torch

    from fastdiff.demo import images

    if x.shape[1] != 2:
        raise ValueError(f"--out must end in .safetensors for vectors of more than 2 dimensions "
                         f"(these have {x.shape[1]}), got {path}")
    lim = float(x.abs().max()) * 1.05 or 1.0
    groups = [x] if y is None else [x[y.cpu() == c] for c in torch.unique(y.cpu())]
    pics = []
    for g in groups:
        h = torch.histogramdd(g.double(), bins=[96, 96], range=[-lim, lim, -lim, lim]).hist
        pics.append((h / h.max().clamp(min=1)).T.flip(0) * 2 - 1)
    images.labelled_grid([(title, torch.stack(pics)[None].float())], path=path, scale=2, vmin=1.0, vmax=-1.0)


def _user_errors() -> tuple:
    """Exceptions that are the user's input, not a bug: exit 2 with a one-line message."""
    from fastdiff.dispatch import BackendUnavailable
    from fastdiff.training.checkpoint import CheckpointError

    return (ValueError, TypeError, CheckpointError, FileNotFoundError, PermissionError, NotADirectoryError,
            IsADirectoryError, FileExistsError, BackendUnavailable, ImportError)


def _runtime_errors() -> tuple:
    """Failures of a correct invocation (diverged training, no memory, a failing disk): exit 1."""
    import torch

    from fastdiff.folder_lock import FolderInUseError

    oom = getattr(torch, "OutOfMemoryError", MemoryError)
    return (FloatingPointError, MemoryError, oom, OSError, FolderInUseError)


def _host_out_of_memory(exc: BaseException) -> str | None:
    """The message of the CPU allocator's failure, which torch raises as a plain RuntimeError (CUDA's is an
    OutOfMemoryError): a size too large for this machine, not a bug."""
    import re

    text = str(exc)
    if not isinstance(exc, RuntimeError) or "can't allocate memory" not in text:
        return None
    tried = re.search(r"tried to allocate (\d+) bytes", text)
    if tried is None:
        return f"out of memory on the CPU: {text}"
    return f"out of memory: the CPU could not allocate {tried[1]} bytes ({int(tried[1]) / 2**30:.1f} GiB)"


def _fail(command: str, exc: BaseException | str, status: int) -> int:
    message = str(exc) or type(exc).__name__
    print(f"fastdiff {command}: error: {message}", file=sys.stderr)
    return status


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if os.environ.get("FASTDIFF_DEBUG", "") not in ("", "0"):
        return args.func(args)  # every error with its traceback
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"fastdiff {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - sorted below; bugs keep their traceback
        if isinstance(exc, _user_errors()):
            return _fail(args.command, exc, 2)
        if isinstance(exc, _runtime_errors()):
            return _fail(args.command, exc, 1)
        if _host_out_of_memory(exc):
            return _fail(args.command, _host_out_of_memory(exc), 1)
        traceback.print_exc()  # a bug: its traceback, and the hint for reports
        print(f"fastdiff {args.command}: internal error (a bug; please report it with the traceback above)",
              file=sys.stderr)
        return 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastdiff", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action=_Version, help="print the version and exit")
    sub = parser.add_subparsers(dest="command", required=True)
    p_info = sub.add_parser("info", help="print versions, devices and available backends")
    p_info.set_defaults(func=_info)

    p_demo = sub.add_parser("demo", help="train a class-conditional model on 8x8 digits (CPU, minutes), "
                                         "write samples.png and metrics.json")
    p_demo.add_argument("--out", default="fastdiff-demo", help="output folder (default: %(default)s)")
    p_demo.add_argument("--steps", type=TRAIN_STEPS, default=2000, help="training steps (default: %(default)s)")
    p_demo.add_argument("--batch-size", type=POSITIVE_INT, default=256)
    p_demo.add_argument("--seed", type=SEED, default=0)
    p_demo.add_argument("--no-progress", action="store_true")
    p_demo.set_defaults(func=_demo)

    p_train = sub.add_parser("train", help="train a small model (works under torchrun for DDP)")
    p_train.add_argument("--data", choices=DATASETS, default="digits",
                         help="digits: UNet on 8x8 digits; ring: MLP on a labelled 2-D Gaussian mixture")
    p_train.add_argument("--out", required=True, help="run folder (checkpoints; resumes from it)")
    p_train.add_argument("--overwrite", action="store_true",
                         help="start a new run in --out, deleting an earlier run's checkpoints there (else: resume)")
    p_train.add_argument("--steps", type=TRAIN_STEPS, default=2000,
                         help="total steps of the run (a resumed run continues to this step)")
    p_train.add_argument("--batch-size", type=POSITIVE_INT, default=256)
    # beyond float32's range the optimizer's lr overflows inside torch
    p_train.add_argument("--lr", type=float_in(0.0, FLOAT32_MAX, low_open=True, high_open=False), default=2e-3)
    p_train.add_argument("--warmup", type=TRAIN_COUNT, default=200)
    p_train.add_argument("--lr-schedule", choices=("constant", "cosine"), default="cosine")
    p_train.add_argument("--grad-clip", type=float_in(0.0), default=1.0, help="max gradient norm (0: no clipping)")
    p_train.add_argument("--ema-decay", type=float_in(0.0, 1.0), default=0.999)
    p_train.add_argument("--path", default="condot", choices=("condot", "vp", "vp-cosine"))
    p_train.add_argument("--prediction", default="velocity", choices=("velocity", "eps", "score", "x0", "v"))
    p_train.add_argument("--time-sampling", default="uniform", choices=("uniform", "logit_normal"))
    p_train.add_argument("--weighting", default="none", choices=("none", "min_snr"))
    p_train.add_argument("--snr-gamma", type=float_in(0.0, low_open=True), default=5.0)
    p_train.add_argument("--label-dropout", type=float_in(0.0, 1.0), default=0.15)
    p_train.add_argument("--amp", action="store_true", help="bf16 autocast")
    p_train.add_argument("--checkpoint-every", type=TRAIN_COUNT, default=500,
                         help="steps between checkpoints (0: only at the end)")
    p_train.add_argument("--keep", type=NON_NEGATIVE_INT, default=2, help="checkpoints kept (0: all)")
    p_train.add_argument("--seed", type=SEED, default=0)
    p_train.add_argument("--on-nonfinite", choices=("stop", "skip"), default="stop",
                         help="a step with a non-finite loss: stop (exit status 1, checkpoints intact) or skip "
                              "it (default: %(default)s)")
    p_train.add_argument("--device", type=device_option, default=None)
    p_train.add_argument("--no-progress", action="store_true")
    p_train.set_defaults(func=_train)

    p_sample = sub.add_parser("sample", help="sample a trained checkpoint into a PNG grid (or .safetensors)")
    add_sampler_arguments(p_sample)
    p_sample.add_argument("--out", default="grid.png", help="a picture in the format its suffix names (.png, .jpg, "
                                                            "...) or .safetensors tensors")
    p_sample.add_argument("--per-class", type=int_in(1, 1 << 16), default=10,
                          help="samples per class (or in all, unconditional)")
    p_sample.add_argument("--device", type=device_option, default="cpu")
    p_sample.set_defaults(func=_sample)
    from fastdiff.cli_generate import add_commands

    add_commands(sub)  # generate, evaluate
    from fastdiff.cli_bench import add_command

    add_command(sub)  # bench

    return parser


if __name__ == "__main__":
    sys.exit(main())
