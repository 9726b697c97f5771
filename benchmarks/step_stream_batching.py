# Run: python -m benchmarks.step_stream_batching
"""CPU: one training step (fwd+bwd) of the official-config MMM4Rec, both shared-TiSSD streams in one [2b] call
vs two calls (same module), median of 7 after 2 warm-ups."""
import statistics, time, torch
from mmm4rec.model import MMM4Rec, MMM4RecConfig
torch.manual_seed(0)
I, b = 4385, 256
cfg = MMM4RecConfig(backend="torch", path="quadratic")
m = MMM4Rec(cfg, I, torch.randn(I + 1, 768), torch.randn(I + 1, 768))
items = torch.randint(1, I, (b, 20)); times = torch.cumsum(torch.rand(b, 20) * 1e5, 1).double()
lens = torch.randint(1, 21, (b,)); tgt = torch.randint(1, I, (b,))
def step():
    m.zero_grad(set_to_none=True); m.loss(items, times, lens, tgt).backward()
res = {}
for name, image in (("one [2b] call", None), ("two calls", m.tissd)) * 2:
    m.tissd_image = image
    for _ in range(2): step()
    ts = []
    for _ in range(7):
        t = time.perf_counter(); step(); ts.append(time.perf_counter() - t)
    res.setdefault(name, []).append(statistics.median(ts))
for k, v in res.items(): print(f"{k}: median step ms per round {[round(x*1e3) for x in v]}")
