"""``fastdiff generate`` and ``fastdiff evaluate``: a checkpoint's samples at scale (alone or under torchrun) and
their Fréchet distance and precision / recall against a reference set (docs/generation.md)."""

from __future__ import annotations

import argparse

from fastdiff.cli_sampler import (POSITIVE_INT, add_sampler_arguments, device_option, int_in, sample_shape,
                                  sampler_settings)

MAX_SAMPLES = 1 << 30  # the set's label and seed tables are int64 per sample: 2^30 samples hold 8 GiB each


def _generate(args: argparse.Namespace) -> int:
    import fastdiff
    from fastdiff.demo.models import load_model
    from fastdiff.training import distributed

    if args.seed + args.num > 1 << 63:  # sample i uses seed + i, an int64
        raise ValueError(f"--seed {args.seed} + --num-samples {args.num} must be at most 2^63")
    device = distributed.setup(args.device).device  # the local GPU under torchrun with CUDA
    model, state = load_model(args.checkpoint, ema=not args.no_ema, device=device)
    classes = getattr(model, "num_classes", 0)
    labels = None if not classes or args.labels == "none" else "balanced"
    settings = sampler_settings(args, state)
    if labels is not None:
        settings["null_y"] = model.null_label
    summary = fastdiff.generate(model, args.num, args.out, shape=sample_shape(state, args.size), seed=args.seed,
                                batch_size=args.batch_size, shard_size=args.shard_size, labels=labels,
                                num_classes=classes or None, checkpoint_sha256=state["sha256"], png=args.png,
                                overwrite=args.overwrite, progress=not args.no_progress, device=device, **settings)
    if summary["rank"] == 0:
        print(f"{args.out}: {args.num} samples ({summary['present']} were there, {summary['job_made']} made by "
              f"{summary['world']} process{'es' if summary['world'] > 1 else ''})")
    if summary["world"] > 1:
        import torch.distributed as dist

        dist.barrier()  # the ranks tear down together (see _train in cli.py)
        dist.destroy_process_group()
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    import json

    import torch

    # the demo's digits and classifier: the command line brings them in, not fastdiff.evaluation
    from fastdiff.demo import data
    from fastdiff.evaluation import evaluate, inception_features

    reference = data.digits().tensors[0] if args.ref == "digits" else args.ref
    features = {"digits": lambda: data.digits_features(), "inception": lambda: inception_features(args.device),
                "raw": lambda: None}[args.features]()
    with torch.no_grad():
        result = evaluate(args.dir, reference, features=features, k=args.k)
    result["features"] = args.features
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("generate", help="sample N samples of a checkpoint into resumable shards (works under "
                                        "torchrun: the set is the same for any number of processes)")
    add_sampler_arguments(p)
    # --num-samples, not only --num: under torchrun, argparse reads "--num" as an abbreviation of its --numa-binding
    p.add_argument("--num-samples", "--num", dest="num", type=int_in(1, MAX_SAMPLES), required=True,
                   help="how many samples (sample i uses seed + i)")
    p.add_argument("--out", required=True, help="the set's folder (shards, manifest.json; a rerun resumes)")
    p.add_argument("--batch-size", type=POSITIVE_INT, default=256, help="samples per sampler call")
    p.add_argument("--shard-size", type=POSITIVE_INT, default=None, help="samples per file (default: batch size)")
    p.add_argument("--labels", choices=("balanced", "none"), default="balanced",
                   help="a conditional model's labels: sample i gets class i mod classes (default), or none")
    p.add_argument("--png", action="store_true",
                   help="also write png/<i>.png per sample (images; i in six digits: png/000005.png)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace another set in --out (its manifest, shards and pictures) instead of refusing")
    p.add_argument("--device", type=device_option, default=None,
                   help="default: the process's GPU under torchrun, else the CPU")
    p.set_defaults(func=_generate)

    p = sub.add_parser("evaluate", help="Fréchet distance and precision/recall of a generated set against a "
                                        "reference set")
    p.add_argument("dir", help="a folder written by fastdiff generate")
    p.add_argument("--ref", required=True, help="a folder written by fastdiff generate, or 'digits' (the demo's)")
    p.add_argument("--features", choices=("digits", "inception", "raw"), default="digits",
                   help="digits: the demo classifier's decision values; inception: Inception-v3 pool features "
                        "(pip install torch-fidelity); raw: the samples themselves (default: %(default)s)")
    p.add_argument("--k", type=POSITIVE_INT, default=3, help="neighbours of precision/recall (default: 3)")
    p.add_argument("--json", default=None, help="also write the result to this file")
    p.add_argument("--device", type=device_option, default="cpu")
    p.set_defaults(func=_evaluate)
