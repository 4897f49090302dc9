"""Comparing Trainer states bit for bit (exact-resume and skip tests share it)."""

import torch


def trainer_state(trainer) -> dict:
    """Clones of everything that evolves in training: weights, EMA and the optimizer's state."""
    out = {f"model/{k}": v.clone() for k, v in trainer.model.state_dict().items()}
    out.update({f"ema/{k}": v.clone() for k, v in trainer.ema_state_dict().items()})
    for i, st in trainer.optimizer.state_dict()["state"].items():
        out.update({f"optim/{i}/{k}": v.clone() for k, v in st.items()})
    return out


def assert_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
