"""examples/: the SASRec-style recommender with TimeAwareSSD trains on CPU (the loss goes down)."""
import importlib.util
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def load_example(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_sasrec_time_ssd_example_trains():
    ex = load_example("sasrec_time_ssd")
    user_lines = [ln for ln in (ROOT / "examples" / "sasrec_time_ssd.py").read_text().split("def synthetic_batches")[0]
                  .splitlines() if ln.strip() and not ln.strip().startswith(("#", '"""'))]
    assert len(user_lines) <= 60, len(user_lines)        # the model + training loop stay small
    torch.manual_seed(0)
    model = ex.TimeSSDRec(num_items=30, d_model=16, n_layers=1, d_state=8, headdim=8)
    batches = ex.synthetic_batches(num_items=30, n_batches=2, b=16, L=8)
    losses = ex.train(model, batches, steps=16, lr=1e-2)
    assert all(map(lambda v: v == v, losses))           # finite
    assert sum(losses[-2:]) / 2 < 0.8 * sum(losses[:2]) / 2, losses
    # the user vector for one history does not depend on the other rows' padding
    items, times, lengths, _ = batches[0]
    model.eval()
    with torch.no_grad():
        u = model(items, times, lengths)
        u0 = model(items[:1, : int(lengths[0])], times[:1, : int(lengths[0])], lengths[:1])
    assert torch.allclose(u[0], u0[0], atol=1e-5)
