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


def _demo(args: argparse.Namespace) -> int:
    from fastdiff import demo

    metrics = demo.run(args.out, steps=args.steps, batch_size=args.batch_size, seed=args.seed,
                       progress=not args.no_progress)
    return 0 if metrics["generated_accuracy"] else 1


DATASETS = ("digits", "ring")


def _dataset_and_model(name: str, seed: int):
    from fastdiff import data, models, testing

    if name == "digits":
        from fastdiff.demo import digits_model

        return data.digits(), digits_model(data.DIGITS_NUM_CLASSES)
    mixture = testing.class_conditional_mixture(num_classes=4, modes_per_class=2, radius=3.0, std=0.3)
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
                      device=args.device)
    if trainer.ctx.is_main and trainer.resumed_from is not None:
        print(f"resumed from {trainer.resumed_from} at step {trainer.step}")
    summary = trainer.fit()
    if trainer.ctx.is_main:
        print(f"step {summary['step']}: loss {summary['loss']:.4f}, {summary['steps_per_second'] or 0:.1f} steps/s; "
              f"checkpoints in {trainer.checkpoint_dir}")
    if trainer.ctx.world > 1:
        torch.distributed.destroy_process_group()
    return 0


def _sample(args: argparse.Namespace) -> int:
    import torch

    import fastdiff
    from fastdiff import images
    from fastdiff.training import load_model

    model, state = load_model(args.checkpoint, ema=not args.no_ema, device=args.device)
    obj = state.get("objective", {})
    path, prediction = obj.get("path", "condot"), obj.get("prediction", "velocity")
    classes = getattr(model, "num_classes", 0)
    if classes:
        y = torch.arange(classes, device=args.device).repeat_interleave(args.per_class)
    else:
        y = None
    config = state["model_config"]
    shape = (config["channels"], args.size, args.size) if config["type"] == "UNet" else (config["dim"],)
    n = len(y) if y is not None else args.per_class
    with torch.no_grad():
        x = fastdiff.sample(model, args.steps, args.cfg, shape=shape, y=y, null_y=model.null_label,
                            batch_size=None if y is not None else n, seed=args.seed, path=path, prediction=prediction,
                            method=args.method, sigma=args.sigma, progress=not args.no_progress,
                            device=args.device).cpu()
    out = args.out
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

    from fastdiff import images

    if x.shape[1] != 2:
        raise SystemExit("sample: --out must end in .safetensors for vectors of more than 2 dimensions")
    lim = float(x.abs().max()) * 1.05 or 1.0
    groups = [x] if y is None else [x[y.cpu() == c] for c in torch.unique(y.cpu())]
    pics = []
    for g in groups:
        h = torch.histogramdd(g.double(), bins=[96, 96], range=[-lim, lim, -lim, lim]).hist
        pics.append((h / h.max().clamp(min=1)).T.flip(0) * 2 - 1)
    images.labelled_grid([(title, torch.stack(pics)[None].float())], path=path, scale=2, vmin=1.0, vmax=-1.0)


def _bench(args: argparse.Namespace) -> int:
    import torch

    from fastdiff import benchmarks

    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    benchmarks.report(ops=args.ops.split(","), log2_sizes=[int(k) for k in args.sizes.split(",")],
                      dtypes=args.dtypes.split(","), device=device, repeat=args.repeat,
                      compile=not args.no_compile, csv_dir=None if args.no_csv else args.csv_dir)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastdiff", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_info = sub.add_parser("info", help="print versions, devices and available backends")
    p_info.set_defaults(func=_info)

    p_demo = sub.add_parser("demo", help="train a class-conditional model on 8x8 digits (CPU, minutes), "
                                         "write samples.png and metrics.json")
    p_demo.add_argument("--out", default="fastdiff-demo", help="output folder (default: %(default)s)")
    p_demo.add_argument("--steps", type=int, default=2000, help="training steps (default: %(default)s)")
    p_demo.add_argument("--batch-size", type=int, default=256)
    p_demo.add_argument("--seed", type=int, default=0)
    p_demo.add_argument("--no-progress", action="store_true")
    p_demo.set_defaults(func=_demo)

    p_train = sub.add_parser("train", help="train a small model (works under torchrun for DDP)")
    p_train.add_argument("--data", choices=DATASETS, default="digits",
                         help="digits: UNet on 8x8 digits; ring: MLP on a labelled 2-D Gaussian mixture")
    p_train.add_argument("--out", required=True, help="run folder (checkpoints; resumes from it)")
    p_train.add_argument("--steps", type=int, default=2000)
    p_train.add_argument("--batch-size", type=int, default=256)
    p_train.add_argument("--lr", type=float, default=2e-3)
    p_train.add_argument("--warmup", type=int, default=200)
    p_train.add_argument("--lr-schedule", choices=("constant", "cosine"), default="cosine")
    p_train.add_argument("--grad-clip", type=float, default=1.0)
    p_train.add_argument("--ema-decay", type=float, default=0.999)
    p_train.add_argument("--path", default="condot", choices=("condot", "vp", "vp-cosine"))
    p_train.add_argument("--prediction", default="velocity", choices=("velocity", "eps", "score", "x0"))
    p_train.add_argument("--time-sampling", default="uniform", choices=("uniform", "logit_normal"))
    p_train.add_argument("--weighting", default="none", choices=("none", "min_snr"))
    p_train.add_argument("--snr-gamma", type=float, default=5.0)
    p_train.add_argument("--label-dropout", type=float, default=0.15)
    p_train.add_argument("--amp", action="store_true", help="bf16 autocast")
    p_train.add_argument("--checkpoint-every", type=int, default=500)
    p_train.add_argument("--keep", type=int, default=2)
    p_train.add_argument("--seed", type=int, default=0)
    p_train.add_argument("--device", default=None)
    p_train.add_argument("--no-progress", action="store_true")
    p_train.set_defaults(func=_train)

    p_sample = sub.add_parser("sample", help="sample a trained checkpoint into a PNG grid (or .safetensors)")
    p_sample.add_argument("--checkpoint", required=True, help="a checkpoint .json/.safetensors or a run's "
                                                              "checkpoints folder (newest valid one)")
    p_sample.add_argument("--out", default="grid.png", help=".png picture or .safetensors tensors")
    p_sample.add_argument("--cfg", type=float, default=1.0, help="classifier-free guidance scale")
    p_sample.add_argument("--per-class", type=int, default=10, help="samples per class (or in all, unconditional)")
    p_sample.add_argument("--steps", type=int, default=50)
    p_sample.add_argument("--method", default="heun", choices=("euler", "heun", "ddim", "dpmpp_2m"))
    p_sample.add_argument("--sigma", type=float, default=0.0, help="SDE noise level (euler)")
    p_sample.add_argument("--size", type=int, default=8, help="image side for UNet checkpoints")
    p_sample.add_argument("--seed", type=int, default=0)
    p_sample.add_argument("--no-ema", action="store_true", help="use the raw weights, not the EMA")
    p_sample.add_argument("--device", default="cpu")
    p_sample.add_argument("--no-progress", action="store_true")
    p_sample.set_defaults(func=_sample)
    p_bench = sub.add_parser("bench", help="time the fused ops against eager PyTorch and torch.compile; "
                                           "print ratios and write CSV rows")
    p_bench.add_argument("--ops", default="step_sde,step_ode,loss,randn,loop",
                         help="loop: 50-step SDE sampling with cfg 4 vs diffusers / torchsde / flow_matching")
    p_bench.add_argument("--sizes", default="20,22", help="log2 of N, comma-separated (default: %(default)s)")
    p_bench.add_argument("--dtypes", default="fp32,bf16", help="prediction dtypes (default: %(default)s)")
    p_bench.add_argument("--repeat", type=int, default=15, help="interleaved rounds (median)")
    p_bench.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p_bench.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's)")
    p_bench.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    p_bench.add_argument("--csv-dir", default="bench/results")
    p_bench.add_argument("--no-csv", action="store_true")
    p_bench.set_defaults(func=_bench)

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
