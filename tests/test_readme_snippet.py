"""README.md "Use it in your model": its python code block runs as written."""
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def section_code(title):
    text = README.read_text()
    start = text.index(f"## {title}\n")
    end = text.find("\n## ", start + 1)
    blocks = re.findall(r"```python\n(.*?)```", text[start:end if end >= 0 else None], flags=re.S)
    assert len(blocks) == 1, f"expected one python block in '{title}', found {len(blocks)}"
    return blocks[0]


@pytest.mark.slow          # torch.compile of the layer: ~40 s: CI runs it with -m slow
def test_use_it_in_your_model_snippet_runs(capsys):
    code = section_code("Use it in your model")
    scope = {}
    exec(compile(code, "README.md:Use it in your model", "exec"), scope)
    assert tuple(scope["y"].shape) == (2, 5, 64) and tuple(scope["y_new"].shape) == (2, 64)
    assert scope["y"][0, 3:].abs().sum() == 0
    assert (scope["y_fast"] - scope["y"]).abs().max() < 1e-5          # torch.compile(fullgraph=True) == eager
    assert "torch.Size([2, 5, 64])" in capsys.readouterr().out
