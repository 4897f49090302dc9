"""A small training run for tests that need their own process (SIGKILL + resume, torchrun DDP).

    python tests/train_script.py OUT --steps 20 [--checkpoint-every 5] [--sleep-after 10] [--amp]
    torchrun --standalone --nproc_per_node 2 tests/train_script.py OUT --steps 8

Writes OUT/final.safetensors (model + EMA weights) from the main process when the run completes.
"""

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the source checkout

from fastdiff import mixtures  # noqa: E402
from fastdiff.demo import models  # noqa: E402
from fastdiff.training import DiffusionObjective, Trainer  # noqa: E402


def build_run(out, steps, checkpoint_every=0, amp=False, callback=None, resume=True, batch_size=64):
    torch.manual_seed(0)
    mixture = mixtures.class_conditional_mixture(num_classes=3, modes_per_class=2, radius=3.0, std=0.3)
    x, comp = mixture.sample(1024, generator=torch.Generator().manual_seed(1))
    y = mixture.labels[comp]
    model = models.MLP(2, num_classes=3, hidden=64, depth=2)
    objective = DiffusionObjective("condot", "velocity", label_dropout=0.2)
    return Trainer(model, (x.float(), y), objective=objective, steps=steps, batch_size=batch_size, lr=2e-3,
                   warmup=3, lr_schedule="cosine", amp=amp, seed=7, out_dir=out,
                   checkpoint_every=checkpoint_every, keep=2, resume=resume, progress=False, log_every=2,
                   callback=callback)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--checkpoint-every", type=int, default=0)
    p.add_argument("--sleep-after", type=int, default=-1, help="sleep 0.2 s per step after this step")
    p.add_argument("--amp", action="store_true")
    a = p.parse_args()

    def slow(trainer):
        if 0 <= a.sleep_after <= trainer.step:
            time.sleep(0.2)

    trainer = build_run(a.out, a.steps, a.checkpoint_every, a.amp, slow)
    if trainer.ctx.is_main and trainer.resumed_from is not None:
        print(f"resumed from {trainer.resumed_from}", flush=True)
    trainer.fit()
    if trainer.ctx.is_main:
        import safetensors.torch as st

        tensors = {f"model/{k}": v for k, v in trainer.model.state_dict().items()}
        tensors.update({f"ema/{k}": v for k, v in trainer.ema_state_dict().items()})
        st.save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(a.out, "final.safetensors"))
    if trainer.ctx.world > 1:
        # tear down together, after rank 0 wrote its file: a rank that destroyed its process group and exited
        # while rank 0 was still writing was once aborted in gloo (SIGABRT), failing the torchrun
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
