"""docs/migrate_attention.md: its python blocks run as written, in order, and the swapped block behaves."""
import math
import re
from pathlib import Path

import pytest
import torch

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "migrate_attention.md"


@pytest.mark.slow          # torch.compile (inductor) of two blocks: ~1 min on 2 cores
def test_migration_guide_code_runs(capsys):
    blocks = re.findall(r"```python\n(.*?)```", GUIDE.read_text(), flags=re.S)
    assert len(blocks) == 2
    scope = {}
    for i, code in enumerate(blocks):
        exec(compile(code, f"{GUIDE.name}:block{i}", "exec"), scope)
    loss = scope["loss"]
    assert math.isfinite(float(loss))
    assert "loss " in capsys.readouterr().out
    blocks_ = scope["blocks"]
    A = torch.exp(blocks_[0].mixer.A_log.detach())                     # reset_parameters ran after the re-init
    assert bool(((A > 0.9) & (A < 17)).all())
    h = torch.randn(2, 5, 50)
    t = torch.cumsum(torch.rand(2, 5) * 100, 1)
    pad = torch.tensor([[False] * 5, [True, True, False, False, False]])
    block = blocks_[0].eval()
    out = block(h, t, pad)
    alone = block(h[1:, 2:], t[1:, 2:], pad[1:, 2:])
    assert torch.allclose(out[1, 2:], alone[0], atol=1e-5)              # left padding changes nothing
