"""finetune.py (Stage 3) on the tiny teacher: next-token loss (with a share of KL) at twice the Stage-2 length, the
chunked cross-entropy against the full one, and --resume."""

import json
import os

import pytest
import torch
import torch.nn.functional as F

import distill
import finetune
import model as M


@pytest.fixture(scope="module")
def distilled(aligned, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ft"))
    distill.main(distill.Config(run_name="f", out_dir=out, input=aligned.align_ckpt, data_dir=aligned.data_dir,
                                layers="1", steps=2, batch_size=2, seq_len=32, valid_batches=1, device="cpu"))
    return out


def run_finetune(aligned, root, **kw):
    cfg = dict(run_name="f", out_dir=root, data_dir=aligned.data_dir, steps=15, batch_size=2, lr=3e-3, kl_weight=0.5,
               valid_batches=1, log_every=1, device="cpu")
    return finetune.main(finetune.Config(**{**cfg, **kw}))


def test_cross_entropy_chunked_matches_reference():
    torch.manual_seed(0)
    h, w = torch.randn(29, 12, requires_grad=True), torch.randn(40, 12, requires_grad=True)
    t = torch.randint(0, 40, (29,))
    ce = finetune.cross_entropy_chunked(h, w, t, chunk=8)
    ce.backward()
    h2, w2 = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    ref = F.cross_entropy(h2 @ w2.t(), t)
    ref.backward()
    torch.testing.assert_close(ce, ref)
    torch.testing.assert_close(h.grad, h2.grad)
    torch.testing.assert_close(w.grad, w2.grad)


def test_finetune_trains_at_twice_the_length(aligned, distilled):
    m = run_finetune(aligned, distilled)
    assert m["seq_len"] == 2 * 32
    losses = [json.loads(line)["loss"] for line in open(os.path.join(distilled, "f", "finetune", "log.jsonl"))]
    assert len(losses) == 15 and sum(losses[-3:]) < sum(losses[:3]), losses
    model, ck = M.load_checkpoint(os.path.join(distilled, "f", "finetune", "ckpt.pt"))
    assert ck["stage"] == "finetune" and model.config.mixers[1] == "attn" and ck["complete"]
    assert m["valid_ce"] > 0 and m["valid_kl"] >= 0


def test_resume_equals_the_uninterrupted_run(aligned, distilled, monkeypatch):
    kw = dict(steps=5, save_every=2)
    whole = run_finetune(aligned, distilled, out="whole", **kw)
    real = finetune.set_lr

    def killed(opt, step, warmup):
        if step == 3:
            raise KeyboardInterrupt
        return real(opt, step, warmup)
    monkeypatch.setattr(finetune, "set_lr", killed)
    with pytest.raises(KeyboardInterrupt):
        run_finetune(aligned, distilled, out="cut", **kw)
    monkeypatch.undo()
    resumed = run_finetune(aligned, distilled, out="cut", resume=True, **kw)
    a, b = (torch.load(os.path.join(distilled, "f", o, "ckpt.pt"), weights_only=True)["model"]
            for o in ("whole", "cut"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["loss"] == whole["loss"] and resumed["valid_ce"] == whole["valid_ce"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU (run on the device)")
def test_graphed_step_trains_as_the_eager_step(aligned, distilled, tmp_path):
    """finetune's step replayed as a CUDA graph (after 3 eager steps) gives the eager step's loss curve; a log line
    averages 4 steps, so a recorded output read without a copy would change it."""
    curves = {}
    for graph in ("false", "true"):
        run_finetune(aligned, distilled, out=f"ft_{graph}", steps=12, log_every=4, micro_batch=1, device="cuda",
                     graph=graph)
        curves[graph] = [json.loads(line)["loss"] for line in open(os.path.join(distilled, "f", f"ft_{graph}",
                                                                                "log.jsonl"))]
    assert curves["true"] == pytest.approx(curves["false"], rel=1e-3), curves
    with pytest.raises(ValueError, match="choose auto, true or false"):
        finetune.Config(graph="on")
