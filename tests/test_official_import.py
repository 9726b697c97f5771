"""import_official: a randomly filled checkpoint laid out with the committed official name list converts into our
checkpoint format with every value in the right place (no official code or weights involved)."""
import json
import os
import re

import pytest
import torch
from safetensors.torch import load_file

from mmm4rec.model import MMM4Rec, MMM4RecConfig
from mmm4rec.official import import_official, official_to_ours

NAMES = os.path.join(os.path.dirname(__file__), "..", "mmm4rec", "model", "official_names.txt")
# tiny sizes: N hidden, D d_inner, H heads, G groups, n d_state, k conv, F ffn, L max_len, K bins, R rows, Ft, Fv
SIZES = dict(N=16, D=32, H=4, G=2, n=4, k=4, F=24, L=6, K=4, R=11, Ft=12, Fv=10)
N_LAYERS = 2


def shape_of(spec: str):
    """'2D+2Gn+H,N' -> (2*32 + 2*2*4 + 4, 16); '-' -> () (a scalar)."""
    if spec == "-":
        return ()
    dims = []
    for dim in spec.split(","):
        total = 0
        for term in dim.split("+"):
            value = 1
            for tok in re.findall(r"Ft|Fv|\d+|[A-Za-z]", term):
                value *= int(tok) if tok.isdigit() else SIZES[tok]
            total += value
        dims.append(total)
    return tuple(dims)


def official_layout():
    """[(name, shape)] of an official checkpoint with N_LAYERS layers, read from the committed name list."""
    rows = []
    with open(NAMES) as f:
        for line in f:
            if line.strip() and not line.startswith("#"):
                name, spec = line.split()
                for i in (range(N_LAYERS) if "{i}" in name else [None]):
                    rows.append((name.format(i=i) if i is not None else name, shape_of(spec)))
    return rows


def random_official_state(seed=0):
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in official_layout():
        shared = re.match(r"^decoder_ssd_layers\.(\d+)\.ssd\.(.+)$", name)
        if shared:                                # the shared TiSSD: the same tensor under both names
            state[name] = state[f"encoder_ssd_layers.{shared.group(1)}.ssd.{shared.group(2)}"]
        elif name == "fusion_factor":
            state[name] = torch.tensor(1.0)
        else:
            state[name] = torch.randn(shape, generator=g)
    return state


def write_lightning_ckpt(path, state):
    torch.save({"state_dict": {f"model.{k}": v for k, v in state.items()}, "epoch": 3}, path)


def test_name_list_covers_every_tensor_of_our_model():
    ours = set(official_to_ours(N_LAYERS).values())
    c = MMM4RecConfig(hidden_size=16, headdim=8, d_state=4, ngroups=2, ffn_inner=24, max_len=6, n_layers=N_LAYERS)
    model = MMM4Rec(c, SIZES["R"] - 1, torch.randn(SIZES["R"], SIZES["Ft"]), torch.randn(SIZES["R"], SIZES["Fv"]))
    assert set(model.state_dict()) - ours == {"image_emb.missing"}   # ours only: the learned missing-image vector
    assert not ours - set(model.state_dict())
    listed = {name for name, _ in official_layout()}
    assert set(official_to_ours(N_LAYERS)) <= listed


def test_import_places_every_value(tmp_path):
    state = random_official_state()
    ckpt = tmp_path / "official.ckpt"
    write_lightning_ckpt(ckpt, state)
    info = import_official(str(ckpt), str(tmp_path / "out"), ngroups=SIZES["G"], backend="torch")
    meta = json.loads((tmp_path / "out" / "config.json").read_text())
    cfg = MMM4RecConfig.from_dict(meta["model_config"])
    assert (cfg.hidden_size, cfg.d_inner, cfg.nheads, cfg.ngroups, cfg.d_state, cfg.n_layers, cfg.ffn_inner,
            cfg.max_len, cfg.with_id) == (16, 32, 4, 2, 4, N_LAYERS, 24, 6, True)
    assert meta["num_items"] == info["num_items"] == SIZES["R"] - 1
    assert cfg.stacking == "per_layer" and not cfg.vision_ffn and cfg.norm_groups == 1
    ours = load_file(str(tmp_path / "out" / "model.safetensors"))
    for theirs, mine in official_to_ours(N_LAYERS).items():
        assert torch.equal(ours[mine], state[theirs]), (theirs, mine)
    # the filters are named by what they filter: official "text_complex_weight" acts on the vision time signal
    assert torch.equal(ours["fourier.1.cl_v.lin_im.bias"], state["decoder_ssd_layers.1.text_complex_weight.0.imag.bias"])
    assert torch.equal(ours["image_emb.missing"], state["vision_adapter.0.bias"])
    feats = load_file(info["features"])
    assert torch.equal(feats["text_feats"], state["text_embedding"])
    assert torch.equal(feats["image_feats"], state["vision_embedding"])
    # the checkpoint loads strictly into a model built from its config.json, and runs
    model = MMM4Rec(cfg, meta["num_items"], feats["text_feats"], feats["image_feats"]).eval()
    missing, unexpected = model.load_state_dict(ours, strict=True)
    items = torch.tensor([[3, 5, 7, 0, 0, 0]])
    times = torch.tensor([[1.6e9, 1.6e9 + 60, 1.6e9 + 3600, 0, 0, 0]], dtype=torch.float64)
    assert torch.isfinite(model.encode(items, times, torch.tensor([3]))).all()


def test_import_exact_switches_deviations(tmp_path):
    ckpt = tmp_path / "official.pt"
    torch.save(random_official_state(), ckpt)                       # a bare state_dict works too
    info = import_official(str(ckpt), str(tmp_path / "out"), ngroups=SIZES["G"], exact=True)
    c = info["config"]
    assert not c["mask_time_padding"] and not c["exclude_padding_item"] and not c["learned_missing_image"]
    assert "image_emb.missing" not in load_file(str(tmp_path / "out" / "model.safetensors"))


@pytest.mark.parametrize("case", ["unshared", "unknown", "groups", "fusion", "not_official", "no_file"])
def test_import_rejects(tmp_path, case):
    state = random_official_state()
    ngroups = SIZES["G"]
    if case == "unshared":
        state["decoder_ssd_layers.0.ssd.A_log"] = state["decoder_ssd_layers.0.ssd.A_log"] + 1
        match = "shared"
    elif case == "unknown":
        state["decoder_ssd_layers.0.co_ssd.extra.weight"] = torch.zeros(2)
        match = "not understood"
    elif case == "groups":
        ngroups, match = 3, "ngroups"
    elif case == "fusion":
        state["fusion_factor"] = torch.zeros(2)
        match = "fusion"
    elif case == "not_official":
        state, match = {"encoder.weight": torch.zeros(2)}, "not an official"
    ckpt = tmp_path / "official.pt"
    if case == "no_file":
        match = "does not exist"
    else:
        torch.save(state, ckpt)
    with pytest.raises(ValueError, match=match):
        import_official(str(ckpt), str(tmp_path / "out"), ngroups=ngroups)


def test_cli_import_official(tmp_path, capsys):
    """`mmm4rec import-official CKPT --out DIR` converts, prints one summary line, and refuses to overwrite."""
    from mmm4rec.cli import main
    ckpt = tmp_path / "official.ckpt"
    write_lightning_ckpt(ckpt, random_official_state())
    out = str(tmp_path / "out")
    assert main(["import-official", str(ckpt), "--out", out, "--ngroups", str(SIZES["G"])]) == 0
    assert "imported" in capsys.readouterr().out
    assert os.path.exists(os.path.join(out, "model.safetensors")) and os.path.exists(os.path.join(out, "config.json"))
    assert main(["import-official", str(ckpt), "--out", out, "--ngroups", str(SIZES["G"])]) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert main(["import-official", str(tmp_path / "nope.ckpt"), "--out", str(tmp_path / "o2")]) == 1
    assert "nope.ckpt" in capsys.readouterr().err
