"""Pipeline B on the tiny random teacher: score.py (KL-guided layer scoring), distill.py (Stage 2), finetune.py
(Stage 3), the chunked losses they use, and the whole chain data -> ... -> finetune -> eval on the CPU.

data -> transfer -> align are built once per module (fixture `run`); every stage then runs a few steps of its main."""

import json
import os
import types

import pytest
import torch
import torch.nn.functional as F

import align
import data
import distill
import eval as ev
import finetune
import model as M
from teachers import from_pretrained
import score
import select_layers
import transfer
from common import kl_div_chunked, kl_div_reference

FAST = dict(batch_size=2, seq_len=32, device="cpu")


@pytest.fixture(scope="module")
def run(tiny_teacher, tiny_corpus, tmp_path_factory):
    """out_dir with run "tiny": data, transfer and a short align."""
    out = str(tmp_path_factory.mktemp("out"))
    common = dict(run="tiny", out_dir=out)
    data.main(data.Config(data=tiny_corpus, teacher=tiny_teacher, **common))
    transfer.main(transfer.Config(teacher=tiny_teacher, **common))
    align.main(align.Config(steps=20, batch_size=4, seq_len=64, lr=3e-3, log_every=10, device="cpu", valid_batches=1,
                            **common))
    return types.SimpleNamespace(out=out, dir=os.path.join(out, "tiny"), teacher=tiny_teacher,
                                 align=os.path.join(out, "tiny", "align", "ckpt.pt"), common=common)


def late_below_early(curve, n=3):
    return sum(curve[-n:]) / n < sum(curve[:n]) / n


# ------------------------------------------------------------------------------------------------- chunked losses

@pytest.mark.parametrize("n, chunk", [(37, 8), (16, 16), (5, 64)])
def test_kl_div_chunked_matches_reference(n, chunk):
    torch.manual_seed(0)
    V, D = 50, 12
    sh, sw = torch.randn(n, D, requires_grad=True), torch.randn(V, D, requires_grad=True)
    th, tw = torch.randn(n, D, requires_grad=True), torch.randn(V, D)
    kl = kl_div_chunked(sh, sw, th, tw, chunk=chunk)
    (kl * 3).backward()
    ref_sh, ref_sw = sh.detach().clone().requires_grad_(), sw.detach().clone().requires_grad_()
    ref = kl_div_reference(ref_sh @ ref_sw.t(), th.detach() @ tw.t())
    (ref * 3).backward()
    torch.testing.assert_close(kl, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sh.grad, ref_sh.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sw.grad, ref_sw.grad, rtol=1e-5, atol=1e-6)
    assert th.grad is None                       # the teacher gets no gradient


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


# ---------------------------------------------------------------------------------------------------------- hybrid

def test_make_hybrid_restores_the_teacher(run):
    """Stage 1 trains only the mixers: with every layer restored, the hybrid IS the teacher."""
    teacher = from_pretrained(run.teacher).eval()
    student, _ = M.load_checkpoint(run.align)
    L = student.config.num_hidden_layers
    idx = torch.randint(0, student.config.vocab_size, (2, 24))
    distill.make_hybrid(student, teacher, [1])
    assert student.config.mixers == ["gla", "attn", "gla", "gla"]
    for name, p in student.model.layers[1].named_parameters():
        assert torch.equal(p, teacher.model.layers[1].get_parameter(name)), name
    distill.make_hybrid(student, teacher, range(L))
    with torch.no_grad():
        torch.testing.assert_close(student(idx), teacher(idx), rtol=1e-5, atol=1e-5)


def test_optimizer_groups(run):
    student, _ = M.load_checkpoint(run.align)
    opt = distill.make_optimizer(student, 1e-4, 7e-6)
    fast, slow = (set(map(id, g["params"])) for g in opt.param_groups)
    names = {id(p): n for n, p in student.named_parameters()}
    assert all(".self_attn." in names[i] or ".input_layernorm." in names[i] for i in fast)
    assert any("post_attention_layernorm" in names[i] for i in slow) and any("embed" in names[i] for i in slow)
    assert len(fast) + len(slow) == len(names) and opt.defaults["betas"] == (0.9, 0.95)


# --------------------------------------------------------------------------------------------------------- distill

def test_distill_trains_and_saves(run):
    m = distill.main(distill.Config(layers="1", steps=24, lr_mixer=3e-3, lr_other=3e-4, warmup=0, valid_batches=2,
                                    save_every=10, **FAST, **run.common))
    kls = [json.loads(line)["kl"] for line in open(os.path.join(run.dir, "distill", "log.jsonl"))]
    assert len(kls) == 24 and all(k >= 0 and k == k for k in kls)
    assert late_below_early(kls), kls
    model, ck = M.load_checkpoint(os.path.join(run.dir, "distill", "ckpt.pt"))
    assert ck["stage"] == "distill" and ck["parent"] == run.align and ck["metrics"]["layers"] == [1]
    assert model.config.mixers == ["gla", "attn", "gla", "gla"]
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert m["valid_kl"] >= 0 and m["tokens"] == 24 * 2 * 32 and ck["config"]["teacher"] == run.teacher


def test_distill_selection_file_untie_and_subfolder(run):
    sel = select_layers.main(select_layers.Config(method="uniform", budget="2", out="sel_u.json", **run.common))
    m = distill.main(distill.Config(selection=os.path.join(run.dir, "select", "sel_u.json"), out="distill_u",
                                    untie=True, steps=3, valid_batches=1, **FAST, **run.common))
    model, ck = M.load_checkpoint(os.path.join(run.dir, "distill_u", "ckpt.pt"))
    assert m["layers"] == sel["layers"]
    assert [i for i, k in enumerate(model.config.mixers) if k == "attn"] == sel["layers"]
    # trained untied, saved re-tied, with the held-out KL measured both ways
    assert model.config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    assert "valid_kl_untied" in m and m["valid_kl"] >= 0


def test_distill_all_linear_and_bad_layers(run):
    m = distill.main(distill.Config(layers="none", out="distill_none", steps=2, valid_batches=1, **FAST, **run.common))
    assert m["layers"] == []
    with pytest.raises(ValueError, match="out of range"):
        distill.main(distill.Config(layers="9", out="distill_bad", steps=1, **FAST, **run.common))


def test_distill_nan_stops_with_a_clear_error(run):
    with pytest.raises(FloatingPointError, match=r"at step \d+.*last good checkpoint is .*distill_nan"):
        distill.main(distill.Config(layers="1", out="distill_nan", steps=20, lr_mixer=1e30, lr_other=1e30, warmup=0,
                                    save_every=1, valid_batches=1, **FAST, **run.common))


# ----------------------------------------------------------------------------------------------------------- score

def read_scores(run, name="score"):
    with open(os.path.join(run.dir, name, "scores.json")) as f:
        return json.load(f)


def test_score_resumes_without_recomputing(run, tmp_path):
    kw = dict(steps=6, eval_every=2, patience=0, input=run.align, **FAST)
    first = score.main(score.Config(layers="0,1", **kw, **run.common))
    assert first["scored"] == [0, 1] and not first["complete"]
    rec = read_scores(run)
    assert rec["scores"][2] is None and rec["layers"]["0"]["finished"] and len(rec["layers"]["0"]["curve"]) == 6
    second = score.main(score.Config(**kw, **run.common))
    assert second["skipped"] == [0, 1] and second["scored"] == [2, 3] and second["complete"]
    third = score.main(score.Config(**kw, **run.common))
    assert third["scored"] == [] and third["skipped"] == [0, 1, 2, 3] and third["ranking"] == second["ranking"]
    rec = read_scores(run)
    # a layer cut off mid-run (stored unfinished) is scored again, from the same batches to the same curve
    cut = json.loads(json.dumps(rec))
    cut["layers"]["2"].update(finished=False, curve=cut["layers"]["2"]["curve"][:2])
    with open(os.path.join(run.dir, "score", "scores.json"), "w") as f:
        json.dump(cut, f)
    fourth = score.main(score.Config(**kw, **run.common))
    assert fourth["scored"] == [2] and read_scores(run)["layers"]["2"]["curve"] == rec["layers"]["2"]["curve"]
    assert all(s is not None and s > 0 for s in rec["scores"]) and sorted(rec["ranking"]) == [0, 1, 2, 3]
    # the same batches for every probe: grouped probes reproduce the resumed curves exactly
    grouped = score.main(score.Config(max_probes=3, **kw, run="grouped", out_dir=str(tmp_path)))
    other = json.load(open(os.path.join(tmp_path, "grouped", "score", "scores.json")))
    for l in "0123":
        assert other["layers"][l]["curve"] == rec["layers"][l]["curve"], l
    assert grouped["ranking"] == second["ranking"]
    # select_layers reads the scores: the K lowest
    sel = select_layers.main(select_layers.Config(method="kl", budget="0.5", **run.common))
    assert sel["layers"] == sorted(rec["ranking"][:2])


def test_score_early_stop_on_stable_top_k(run, tmp_path):
    """budget 1.0: the top-K set is all layers, so it is stable from the second round and the probes stop."""
    m = score.main(score.Config(input=run.align, budget="1.0", steps=10, eval_every=1, patience=2, run="es",
                                out_dir=str(tmp_path), **FAST))
    rec = json.load(open(os.path.join(tmp_path, "es", "score", "scores.json")))
    assert m["early_stopped"] and m["stopped_at"] == 3
    for l in "0123":
        assert rec["layers"][l]["early_stopped"] and rec["layers"][l]["stopped_at"] == 3
        assert len(rec["layers"][l]["curve"]) == 3
    again = score.main(score.Config(input=run.align, budget="1.0", steps=10, eval_every=1, patience=2, run="es",
                                    out_dir=str(tmp_path), **FAST))
    assert again["skipped"] == [0, 1, 2, 3]


# -------------------------------------------------------------------------------------------------------- finetune

def test_finetune_trains_at_twice_the_length(run):
    if not os.path.exists(os.path.join(run.dir, "distill", "ckpt.pt")):
        distill.main(distill.Config(layers="1", steps=2, valid_batches=1, **FAST, **run.common))
    m = finetune.main(finetune.Config(steps=15, batch_size=2, lr=3e-3, warmup=0, kl_weight=0.5, valid_batches=1,
                                      device="cpu", **run.common))
    assert m["seq_len"] == 2 * 32
    losses = [json.loads(line)["loss"] for line in open(os.path.join(run.dir, "finetune", "log.jsonl"))]
    assert len(losses) == 15 and late_below_early(losses), losses
    model, ck = M.load_checkpoint(os.path.join(run.dir, "finetune", "ckpt.pt"))
    assert ck["stage"] == "finetune" and model.config.mixers[1] == "attn"
    assert m["valid_ce"] > 0 and m["valid_kl"] >= 0


# ------------------------------------------------------------------------------------------------------ full chain

def test_full_chain(tiny_teacher, tiny_corpus, tmp_path):
    """data -> transfer -> align -> score -> select -> distill -> finetune -> eval with each stage's defaults
    chaining the paths: the only flags are sizes."""
    common = dict(run="chain", out_dir=str(tmp_path))
    data.main(data.Config(data=tiny_corpus, teacher=tiny_teacher, **common))
    transfer.main(transfer.Config(teacher=tiny_teacher, **common))
    align.main(align.Config(steps=5, batch_size=2, seq_len=32, log_every=5, device="cpu", valid_batches=1, **common))
    score.main(score.Config(steps=4, eval_every=2, **FAST, **common))
    sel = select_layers.main(select_layers.Config(method="kl", budget="0.25", **common))
    d = distill.main(distill.Config(steps=3, valid_batches=1, **FAST, **common))
    assert d["layers"] == sel["layers"] and len(sel["layers"]) == 1
    finetune.main(finetune.Config(steps=2, batch_size=2, valid_batches=1, device="cpu", **common))
    model, ck = M.load_checkpoint(os.path.join(tmp_path, "chain", "finetune", "ckpt.pt"))
    assert ck["parent"].endswith(os.path.join("chain", "distill", "ckpt.pt")) and model.config.mixers.count("attn") == 1
    ev.main(ev.Config(lengths="384", n=1, tasks="niah_single", ppl_seq_len=32, ppl_windows=2, batch_size=2,
                      speed="off", device="cpu", **common))
    assert os.path.exists(os.path.join(tmp_path, "chain", "eval", "eval.json"))
