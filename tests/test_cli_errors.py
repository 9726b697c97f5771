"""Every CLI failure a user can cause ends in ONE line `mmm4rec <cmd>: error: ...` naming the file / column / flag,
exit status 1, no traceback (issue 14); Ctrl-C gives 130 after writing a resumable last/; nothing is overwritten."""
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from mmm4rec.cli import main
from mmm4rec.data import make_synthetic_dataset

SMALL = ["--hidden-size", "16", "--headdim", "8", "--d-state", "8", "--ngroups", "1", "--backend", "torch",
         "--path", "quadratic", "--device", "cpu", "--quiet", "--batch-size", "128", "--grad-accum", "1"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """A prepared tiny dataset, its raw files and a 1-epoch run (shared by the table; cases copy what they break)."""
    base = tmp_path_factory.mktemp("ws")
    syn = make_synthetic_dataset(60, 30, 500, feat_dim=12, image_coverage=0.7, seed=0, name="toy")
    raw = syn.write_atomic(str(base / "raw"))
    data, run = str(base / "data"), str(base / "run")
    assert main(["prepare", "--inter", raw["inter"], "--text-feats", raw["text_feats"], "--text-ids",
                 raw["text_rows"], "--kcore", "0", "--max-len", "6", "--out", data]) == 0
    assert main(["finetune", "--data", data, "--out", run, "--epochs", "1", *SMALL]) == 0
    return {"base": base, "raw": raw, "data": data, "run": run, "ckpt": os.path.join(run, "best")}


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _write(path, text_or_bytes):
    mode = "wb" if isinstance(text_or_bytes, bytes) else "w"
    with open(path, mode) as f:
        f.write(text_or_bytes)
    return path


def _truncate(path, keep=0.5):
    b = open(path, "rb").read()
    _write(path, b[: int(len(b) * keep)])


# each case: (id, build(ws, tmp) -> argv, regex the error line must match)
def c_missing_inter(ws, t):
    return ["prepare", "--inter", str(t / "nope.inter"), "--encoder", "hashed", "--out", str(t / "d")]


def c_no_inter(ws, t):
    return ["prepare", "--out", str(t / "d")]


def c_date_token_column(ws, t):
    p = _write(t / "d.inter", "user_id:token\titem_id:token\ttimestamp:token\nu1\ti1\t2020-01-01\nu1\ti2\t2020-01-02\n")
    return ["prepare", "--inter", str(p), "--out", str(t / "d")]


def c_bad_float_column(ws, t):
    p = _write(t / "d.inter", "user_id:token\titem_id:token\ttimestamp:float\nu1\ti1\t1\nu1\ti2\tlater\n")
    return ["prepare", "--inter", str(p), "--out", str(t / "d")]


def c_missing_column(ws, t):
    return ["prepare", "--inter", ws["raw"]["inter"], "--time-field", "ts", "--out", str(t / "d")]


def c_missing_text_feats(ws, t):
    return ["prepare", "--inter", ws["raw"]["inter"], "--text-feats", str(t / "no.npy"), "--text-ids",
            ws["raw"]["text_rows"], "--out", str(t / "d")]


def c_corrupt_text_feats(ws, t):
    p = _write(t / "f.npy", b"\x93NUMPY garbage")
    return ["prepare", "--inter", ws["raw"]["inter"], "--text-feats", str(p), "--text-ids", ws["raw"]["text_rows"],
            "--out", str(t / "d")]


def c_missing_data(ws, t):
    return ["finetune", "--data", str(t / "nodata"), "--out", str(t / "r"), *SMALL]


def c_corrupt_meta(ws, t):
    d = _copy(ws["data"], t / "d")
    _write(os.path.join(d, "meta.json"), '{"name": "x", "item_tok')
    return ["finetune", "--data", str(d), "--out", str(t / "r"), *SMALL]


def c_truncated_sequences(ws, t):
    d = _copy(ws["data"], t / "d")
    _truncate(os.path.join(d, "sequences.safetensors"))
    return ["finetune", "--data", str(d), "--out", str(t / "r"), *SMALL]


def c_epochs_zero(ws, t):
    return ["finetune", "--data", ws["data"], "--out", str(t / "r"), "--epochs", "0", *SMALL]


def c_existing_run(ws, t):
    return ["finetune", "--data", ws["data"], "--out", ws["run"], "--epochs", "1", *SMALL]


def c_corrupt_trainer_pt(ws, t):
    r = _copy(ws["run"], t / "r")
    _write(os.path.join(r, "last", "trainer.pt"), b"not a torch file at all")
    return ["finetune", "--data", ws["data"], "--out", str(r), "--resume", "--epochs", "2", *SMALL]


def c_resume_without_last(ws, t):
    r = _copy(ws["run"], t / "r")
    shutil.rmtree(os.path.join(r, "last"))
    return ["finetune", "--data", ws["data"], "--out", str(r), "--resume", *SMALL]


def c_no_cuda(ws, t):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    return ["finetune", "--data", ws["data"], "--out", str(t / "r"), *SMALL, "--device", "cuda"]


def c_time_budget_zero(ws, t):
    return ["finetune", "--data", ws["data"], "--out", str(t / "r"), "--time-budget", "0", *SMALL]


def c_bad_model_flags(ws, t):
    return ["finetune", "--data", ws["data"], "--out", str(t / "r"), *SMALL, "--headdim", "7"]


def c_missing_checkpoint(ws, t):
    return ["evaluate", "--checkpoint", str(t / "nockpt"), "--data", ws["data"], "--device", "cpu"]


def c_truncated_model(ws, t):
    c = _copy(ws["ckpt"], t / "c")
    _truncate(os.path.join(c, "model.safetensors"))
    return ["evaluate", "--checkpoint", str(c), "--data", ws["data"], "--device", "cpu"]


def c_random_model(ws, t):
    c = _copy(ws["ckpt"], t / "c")
    _write(os.path.join(c, "model.safetensors"), os.urandom(4096))
    return ["evaluate", "--checkpoint", str(c), "--data", ws["data"], "--device", "cpu"]


def c_missing_model(ws, t):
    c = _copy(ws["ckpt"], t / "c")
    os.remove(os.path.join(c, "model.safetensors"))
    return ["evaluate", "--checkpoint", str(c), "--data", ws["data"], "--device", "cpu"]


def c_corrupt_config(ws, t):
    c = _copy(ws["ckpt"], t / "c")
    _write(os.path.join(c, "config.json"), "{nope")
    return ["evaluate", "--checkpoint", str(c), "--data", ws["data"], "--device", "cpu"]


def c_k_zero(ws, t):
    return ["recommend", "--checkpoint", ws["ckpt"], "--data", ws["data"], "--users", "u1", "--k", "0",
            "--device", "cpu"]


def c_k_negative(ws, t):
    return ["recommend", "--checkpoint", ws["ckpt"], "--data", ws["data"], "--users", "u1", "--k", "-3",
            "--device", "cpu"]


def c_unknown_user(ws, t):
    return ["recommend", "--checkpoint", ws["ckpt"], "--data", ws["data"], "--users", "nobody", "--device", "cpu"]


def c_users_and_history(ws, t):
    return ["recommend", "--checkpoint", ws["ckpt"], "--data", ws["data"], "--users", "u1", "--history", "i1",
            "--device", "cpu"]


def c_unknown_flag(ws, t):
    return ["evaluate", "--checkpoint", ws["ckpt"], "--data", ws["data"], "--frobnicate"]


def c_negative_threads(ws, t):
    return ["evaluate", "--checkpoint", ws["ckpt"], "--data", ws["data"], "--threads", "-1"]


def c_import_official_missing(ws, t):
    return ["import-official", str(t / "official.pth"), "--out", str(t / "o")]


CASES = [
    (c_missing_inter, r"prepare: error: .*nope\.inter: no such file"),
    (c_no_inter, r"prepare: error: give --inter"),
    (c_date_token_column, r"prepare: error: .*d\.inter: column 'timestamp' .*2020-01-01"),
    (c_bad_float_column, r"prepare: error: .*d\.inter: column 'timestamp' line 3: 'later'"),
    (c_missing_column, r"prepare: error: .*toy\.inter: no column 'ts'.*--time-field"),
    (c_missing_text_feats, r"prepare: error: --text-feats .*no\.npy: no such file"),
    (c_corrupt_text_feats, r"prepare: error: --text-feats .*f\.npy"),
    (c_missing_data, r"finetune: error: .*nodata is not a prepared dataset dir"),
    (c_corrupt_meta, r"finetune: error: .*meta\.json is corrupted"),
    (c_truncated_sequences, r"finetune: error: .*sequences\.safetensors is corrupted"),
    (c_epochs_zero, r"finetune: error: argument --epochs: --epochs must be >= 1"),
    (c_existing_run, r"finetune: error: --out .*run already holds a run .*--resume.*--overwrite"),
    (c_corrupt_trainer_pt, r"finetune: error: .*last/trainer\.pt is corrupted"),
    (c_resume_without_last, r"finetune: error: --resume: .*no last/trainer\.pt.*--overwrite"),
    (c_no_cuda, r"finetune: error: --device cuda: .*no usable CUDA"),
    (c_time_budget_zero, r"finetune: error: argument --time-budget: --time-budget must be > 0"),
    (c_bad_model_flags, r"finetune: error: model flags: .*headdim"),
    (c_missing_checkpoint, r"evaluate: error: .*nockpt is not a checkpoint dir"),
    (c_truncated_model, r"evaluate: error: .*c/model\.safetensors cannot be loaded"),
    (c_random_model, r"evaluate: error: .*c/model\.safetensors cannot be loaded"),
    (c_missing_model, r"evaluate: error: .*c/model\.safetensors: no such file"),
    (c_corrupt_config, r"evaluate: error: .*c/config\.json is corrupted"),
    (c_k_zero, r"recommend: error: --k must be >= 1, got 0"),
    (c_k_negative, r"recommend: error: --k must be >= 1, got -3"),
    (c_unknown_user, r"recommend: error: unknown user id 'nobody'"),
    (c_users_and_history, r"recommend: error: give either --users or --history"),
    (c_unknown_flag, r"mmm4rec: error: unrecognized arguments: --frobnicate"),
    (c_negative_threads, r"evaluate: error: --threads must be >= 0, got -1"),
    (c_import_official_missing, r"import-official: error: .*(official\.pth: no such file|mmm4rec\.official is "
                                r"not available)"),
]


@pytest.mark.parametrize("build,pattern", CASES, ids=[c[0].__name__[2:] for c in CASES])
def test_error_table(ws, tmp_path, capsys, build, pattern):
    import re
    argv = build(ws, tmp_path)
    capsys.readouterr()
    assert main(argv) == 1
    out, err = capsys.readouterr()
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert "Traceback" not in err + out
    assert lines and lines[-1].startswith("mmm4rec"), err
    assert re.search(pattern, lines[-1]), lines[-1]
    assert len([ln for ln in lines if ": error:" in ln]) == 1, err


def test_choose_threads():
    from mmm4rec.cli import choose_threads
    assert choose_threads(3) == (3, "--threads")
    n, why = choose_threads(0)
    assert n >= 1 and why.startswith("auto")


def test_debug_shows_the_exception(ws, tmp_path):
    with pytest.raises(ValueError, match="not a checkpoint dir"):
        main(["evaluate", "--checkpoint", str(tmp_path / "x"), "--data", ws["data"], "--debug"])


def test_recommend_caps_k_and_never_returns_padding(ws, tmp_path, capsys):
    rj = str(tmp_path / "r.json")
    assert main(["recommend", "--checkpoint", ws["ckpt"], "--data", ws["data"], "--users", "u1", "--k", "500",
                 "--json", rj, "--device", "cpu"]) == 0
    items = [e["item"] for e in json.load(open(rj))["u1"]]
    assert "capped at 30" in capsys.readouterr().err
    assert len(items) == 30 and "[PAD]" not in items and len(set(items)) == 30
    assert main(["recommend", "--checkpoint", ws["ckpt"], "--data", ws["data"], "--users", "u1", "--k", "500",
                 "--exclude-seen", "--json", rj, "--device", "cpu"]) == 0
    left = [e["item"] for e in json.load(open(rj))["u1"]]
    from mmm4rec.data import SequentialData
    d = SequentialData.load(ws["data"])
    u = d.user_index(["u1"])[0]
    seen = {str(d.item_tokens[i]) for i in d.seq_items[d.seq_offsets[u]:d.seq_offsets[u + 1]]}
    assert set(left) == {str(t) for t in d.item_tokens[1:]} - seen


def test_overwrite_and_epochs_resume(ws, tmp_path, capsys):
    r = _copy(ws["run"], tmp_path / "r")
    before = open(os.path.join(r, "best", "model.safetensors"), "rb").read()
    assert main(["finetune", "--data", ws["data"], "--out", str(r), "--epochs", "1", *SMALL]) == 1
    assert open(os.path.join(r, "best", "model.safetensors"), "rb").read() == before   # nothing replaced
    assert main(["finetune", "--data", ws["data"], "--out", str(r), "--resume", "--epochs", "2", *SMALL]) == 0
    assert [e["epoch"] for e in json.load(open(os.path.join(r, "log.json")))] == [1, 2]
    assert main(["finetune", "--data", ws["data"], "--out", str(r), "--overwrite", "--max-batches", "1",
                 *SMALL]) == 0
    log = json.load(open(os.path.join(r, "log.json")))
    assert len(log) == 1 and log[0]["partial"] and json.load(open(os.path.join(r, "summary.json")))[
        "stopped_by"] == "batch budget"


def test_ctrl_c_saves_resumable_last(ws, tmp_path, capsys, monkeypatch):
    """KeyboardInterrupt inside training (the 3rd batch): exit 130, a resumable last/ at the last step boundary."""
    from mmm4rec.model import MMM4Rec
    real = MMM4Rec.loss
    calls = {"n": 0}

    def interrupted(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(MMM4Rec, "loss", interrupted)
    r = str(tmp_path / "r")
    assert main(["finetune", "--data", ws["data"], "--out", r, "--epochs", "3", *SMALL[:-4],
                 "--batch-size", "32", "--grad-accum", "1"]) == 130
    err = capsys.readouterr().err
    assert "interrupted; resumable checkpoint in" in err and "Traceback" not in err
    st = torch.load(os.path.join(r, "last", "trainer.pt"), weights_only=False)
    assert st["epoch"] == 0 and st["batch_in_epoch"] == 2 and st["total_batches"] == 2
    monkeypatch.setattr(MMM4Rec, "loss", real)
    assert main(["finetune", "--data", ws["data"], "--out", r, "--resume", "--epochs", "1", *SMALL[:-4],
                 "--batch-size", "32", "--grad-accum", "1"]) == 0
    assert "resumed from" in capsys.readouterr().out
    s = json.load(open(os.path.join(r, "summary.json")))
    nb = -(-(500 - 3 * 60) // 32)
    assert s["epochs_run"] == 1 and s["total_batches"] == nb


def test_init_inherits_depth_and_explains_dropped(ws, tmp_path, capsys):
    pre = str(tmp_path / "pre")
    assert main(["pretrain", "--data", ws["data"], "--out", pre, "--epochs", "1", "--n-layers", "2", "--with-id",
                 *SMALL]) == 0
    capsys.readouterr()
    assert main(["finetune", "--data", ws["data"], "--out", str(tmp_path / "a"), "--init", os.path.join(pre, "best"),
                 "--max-batches", "1", *SMALL]) == 0
    out = capsys.readouterr().out
    assert "2 layer(s)" in out and "item-specific" in out and "dropped" not in out
    assert main(["finetune", "--data", ws["data"], "--out", str(tmp_path / "b"), "--init", os.path.join(pre, "best"),
                 "--max-batches", "1", "--n-layers", "1", *SMALL]) == 0
    out = capsys.readouterr().out
    assert "1 layer(s)" in out and "tensors of pre-trained layers >= 2" in out


def test_export_safetensors_has_ids(ws, tmp_path):
    f = str(tmp_path / "emb.safetensors")
    assert main(["export", "--checkpoint", ws["ckpt"], "--data", ws["data"], "--out", f, "--quiet",
                 "--device", "cpu"]) == 0
    with safe_open(f, "np") as s:
        meta = s.metadata()
        users = json.loads(meta["user_ids"])
        assert s.get_tensor("user_embeddings").shape[0] == len(users) == 60
        assert json.loads(meta["item_ids"])[0] == "[PAD]"


def test_sigint_subprocess(ws, tmp_path):
    """The real thing: SIGINT to `python -m mmm4rec finetune` -> exit 130, one line, resumable last/."""
    r = str(tmp_path / "r")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.Popen([sys.executable, "-m", "mmm4rec", "finetune", "--data", ws["data"], "--out", r,
                          "--epochs", "1000", "--patience", "1000", "--checkpoint-every", "0.0001", *SMALL[:-4],
                          "--batch-size", "8", "--grad-accum", "1"],      # no early stop: still training at SIGINT
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                         # a suite started in the background (`cmd &`) inherits SIGINT = ignored, and Python then
                         # installs no KeyboardInterrupt handler: give the child the default disposition
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    import time
    t0 = time.time()
    while not os.path.exists(os.path.join(r, "last", "trainer.pt")):  # training runs (last/ after every step)
        assert p.poll() is None and time.time() - t0 < 120, p.stderr.read()
        time.sleep(0.1)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    assert "Traceback" not in err and "resumable checkpoint in" in err
    assert os.path.exists(os.path.join(r, "last", "trainer.pt"))
