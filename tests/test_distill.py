"""distill.py (Stage 2) on the tiny teacher: the hybrid (restored layers are the teacher's attention and pre-attention
norm), the loss (forward KL(teacher || student), mean over tokens, chunked without changing it), the two lr groups,
training and saving, untie/re-tie, the NaN guard, --resume, the teacher check, and the compiled model."""

import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

import distill
import model as M
from common import kl_div_chunked, kl_div_reference
from conftest import write_tiny_llama, write_tokenizer, make_text
from teachers import from_pretrained

FAST = dict(batch_size=2, seq_len=32, device="cpu", log_every=1)


def run_distill(aligned, tmp_path, **kw):
    cfg = dict(run_name="d", out_dir=str(tmp_path), input=aligned.align_ckpt, data_dir=aligned.data_dir, layers="1",
               steps=6, valid_batches=1, **FAST)
    return distill.main(distill.Config(**{**cfg, **kw}))


def late_below_early(curve, n=3):
    return sum(curve[-n:]) / n < sum(curve[:n]) / n


# ------------------------------------------------------------------------------------------------------ the loss

def test_kl_is_forward_and_a_mean_over_tokens():
    """KL(p || q) with p the teacher's: rows [p = (0.5, 0.5), q = (0.9, 0.1)] and [p = q]. Forward KL of the first
    row is 0.5 ln(0.5/0.9) + 0.5 ln(0.5/0.1) = 0.5108; the reverse (q || p) would be 0.3681; the mean over the two
    rows halves it; a sum would not."""
    t = torch.log(torch.tensor([[0.5, 0.5], [0.3, 0.7]]))
    s = torch.log(torch.tensor([[0.9, 0.1], [0.3, 0.7]]))
    eye = torch.eye(2)  # hidden states are the logits when the head is the identity
    forward_kl = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    assert kl_div_chunked(s, eye, t, eye, chunk=1).item() == pytest.approx(forward_kl / 2, rel=1e-6)
    assert kl_div_reference(s, t).item() == pytest.approx(forward_kl / 2, rel=1e-6)


@pytest.mark.parametrize("n, chunk", [(37, 8), (16, 16), (5, 64)])
def test_kl_div_chunked_matches_the_full_logits(n, chunk):
    """The chunked KL and its gradients equal autograd through full logits (torch's own kl_div), any chunking."""
    torch.manual_seed(0)
    V, D = 50, 12
    sh, sw = torch.randn(n, D, requires_grad=True), torch.randn(V, D, requires_grad=True)
    th, tw = torch.randn(n, D, requires_grad=True), torch.randn(V, D)
    kl = kl_div_chunked(sh, sw, th, tw, chunk=chunk)
    (kl * 3).backward()
    ref_sh, ref_sw = sh.detach().clone().requires_grad_(), sw.detach().clone().requires_grad_()
    ref = F.kl_div(F.log_softmax(ref_sh @ ref_sw.t(), -1), F.log_softmax(th.detach() @ tw.t(), -1), log_target=True,
                   reduction="batchmean")
    (ref * 3).backward()
    torch.testing.assert_close(kl, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sh.grad, ref_sh.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sw.grad, ref_sw.grad, rtol=1e-5, atol=1e-6)
    assert th.grad is None                       # the teacher gets no gradient


# ---------------------------------------------------------------------------------------------------- the hybrid

def test_make_hybrid_restores_the_teachers_attention_and_norm(aligned):
    teacher = from_pretrained(aligned.teacher).eval()
    student, _ = M.load_checkpoint(aligned.align_ckpt)
    with torch.no_grad():  # the student's norms differ from the teacher's, as after a distill
        for layer in student.model.layers:
            layer.input_layernorm.weight.add_(0.5)
    before = [layer.input_layernorm.weight.clone() for layer in student.model.layers]
    distill.make_hybrid(student, teacher, [1])
    assert student.config.mixers == ["gla", "attn", "gla", "gla"]
    for name, p in student.model.layers[1].self_attn.named_parameters():
        assert torch.equal(p, teacher.model.layers[1].self_attn.get_parameter(name)), name
    assert torch.equal(student.model.layers[1].input_layernorm.weight, teacher.model.layers[1].input_layernorm.weight)
    for l in (0, 2, 3):  # the other layers keep their own
        assert torch.equal(student.model.layers[l].input_layernorm.weight, before[l])
    # every layer restored (and the norms back) is the teacher itself
    distill.make_hybrid(student, teacher, range(4))
    idx = torch.randint(0, student.config.vocab_size, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(student(idx), teacher(idx), rtol=1e-5, atol=1e-5)


def test_the_teacher_runs_compiled_as_the_student(aligned):
    """--compile compiles the running teacher's blocks too (by default on the GPU; here --compile=true, inductor on
    the CPU): the same hidden states as the eager teacher, while the fp32 teacher that make_hybrid reads stays as it
    was; without --compile=true the CPU runs that fp32 teacher itself."""
    teacher32, _, teacher = distill.load_teachers(aligned.teacher, "cpu", distill.Config(compile="true"))
    assert teacher is not teacher32 and all(b._compiled_call_impl is not None for b in teacher.model.layers)
    assert all(b._compiled_call_impl is None for b in teacher32.model.layers)
    idx = torch.randint(0, teacher.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    ref, out = distill.teacher_hidden(teacher32, idx, "cpu"), distill.teacher_hidden(teacher, idx, "cpu")
    assert (out - ref).abs().max().item() < 1e-5
    t32, _, t = distill.load_teachers(aligned.teacher, "cpu", distill.Config())
    assert t is t32


def test_optimizer_groups_follow_radlads(aligned):
    """Mixers and pre-attention norms at lr_mixer, every other parameter at lr_other; AdamW(0.9, 0.95)."""
    student, _ = M.load_checkpoint(aligned.align_ckpt)
    distill.make_hybrid(student, from_pretrained(aligned.teacher), [1])
    opt = distill.make_optimizer(student, 1e-4, 7e-6, 0.01)
    names = {id(p): n for n, p in student.named_parameters()}
    fast, slow = ({names[id(p)] for p in g["params"]} for g in opt.param_groups)
    want_fast = {n for n in names.values() if ".self_attn." in n or ".input_layernorm." in n}
    assert fast == want_fast and slow == set(names.values()) - want_fast
    assert any("input_layernorm" in n for n in fast) and any("post_attention_layernorm" in n for n in slow)
    assert [g["lr"] for g in opt.param_groups] == [1e-4, 7e-6] and opt.defaults["betas"] == (0.9, 0.95)
    assert opt.defaults["weight_decay"] == 0.01
    cfg = distill.Config()
    assert (cfg.lr_mixer, cfg.lr_other, cfg.warmup, cfg.clip) == (1e-4, 7e-6, 0, 1.0)  # RADLADS step 2, constant lr


# ------------------------------------------------------------------------------------------------------ training

def test_distill_trains_and_saves(aligned, tmp_path):
    m = run_distill(aligned, tmp_path, steps=24, lr_mixer=3e-3, lr_other=3e-4, valid_batches=2, save_every=10,
                    snapshots="64,1e3")
    out = os.path.join(tmp_path, "d", "distill")
    kls = [json.loads(line)["kl"] for line in open(os.path.join(out, "log.jsonl"))]
    assert len(kls) == 24 and all(k >= 0 and k == k for k in kls)
    assert late_below_early(kls), kls
    model, ck = M.load_checkpoint(os.path.join(out, "ckpt.pt"))
    assert ck["stage"] == "distill" and ck["parent"] == aligned.align_ckpt and ck["metrics"]["layers"] == [1]
    assert ck["complete"] and "train_state" not in ck and ck["teacher"]["source"] == aligned.teacher
    assert model.config.mixers == ["gla", "attn", "gla", "gla"]
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert m["valid_kl"] >= 0 and m["tokens"] == 24 * 2 * 32 and ck["config"]["teacher"] == aligned.teacher
    # --snapshots: the model as it was when each token count was crossed (64 tokens a step: steps 1 and 16)
    snaps = {n: M.load_checkpoint(os.path.join(out, f"tokens_{n}", "ckpt.pt")) for n in (64, 1000)}
    assert [snaps[n][1]["metrics"] for n in (64, 1000)] == [{"step": 1, "tokens": 64}, {"step": 16, "tokens": 1024}]
    final = model.model.layers[0].self_attn.q_proj.weight
    w = {n: snaps[n][0].model.layers[0].self_attn.q_proj.weight for n in snaps}
    assert not torch.equal(w[64], w[1000]) and not torch.equal(w[1000], final)


def test_selection_file_untie_retie_and_subfolder(aligned, tmp_path):
    import select_layers
    sel = select_layers.main(select_layers.Config(run_name="d", out_dir=str(tmp_path), align=aligned.align_ckpt,
                                                  method="uniform", budget="2", out="sel_u.json"))
    m = run_distill(aligned, tmp_path, layers="", selection=os.path.join(tmp_path, "d", "select", "sel_u.json"),
                    out="distill_u", untie=True, steps=3, lr_other=1e-2)
    model, ck = M.load_checkpoint(os.path.join(tmp_path, "d", "distill_u", "ckpt.pt"))
    assert m["layers"] == sel["layers"] == [i for i, k in enumerate(model.config.mixers) if k == "attn"]
    # trained untied, saved re-tied keeping the embedding (RADLADS), the held-out KL measured both ways
    assert model.config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    assert "valid_kl_untied" in m and m["valid_kl"] >= 0


def test_all_linear_and_bad_layers(aligned, tmp_path):
    assert run_distill(aligned, tmp_path, layers="none", out="distill_none", steps=2)["layers"] == []
    with pytest.raises(ValueError, match="out of range"):
        run_distill(aligned, tmp_path, layers="9", out="distill_bad", steps=1)


def test_nan_stops_naming_a_good_checkpoint(aligned, tmp_path, monkeypatch):
    """Step 3's loss is NaN: its update is skipped, the run stops at the log step, naming the step-2 checkpoint
    (finite, mid-run) and the flags that exist."""
    real, calls = distill.kl_div_chunked, []

    def poisoned(*a):
        calls.append(1)
        return real(*a) * (float("nan") if len(calls) == 3 else 1.0)
    monkeypatch.setattr(distill, "kl_div_chunked", poisoned)
    with pytest.raises(FloatingPointError, match=r"at step 3.*last good checkpoint is .*distill_nan.*--lr_mixer"):
        run_distill(aligned, tmp_path, out="distill_nan", steps=6, save_every=2)
    model, info = M.load_checkpoint(os.path.join(tmp_path, "d", "distill_nan", "ckpt.pt"))
    assert info["metrics"]["step"] == 2 and not info["complete"]
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_weights_that_blow_up_are_never_written(aligned, tmp_path, monkeypatch):
    """An update that leaves a weight infinite (at step 3) is never published: the checkpoint on disk stays the
    step-2 one, finite."""
    real, calls = distill.skip_nonfinite, []

    def blow_up(opt, loss, norm):
        real(opt, loss, norm)
        calls.append(1)
        if len(calls) == 3:
            with torch.no_grad():
                opt.param_groups[1]["params"][0].fill_(float("inf"))
    monkeypatch.setattr(distill, "skip_nonfinite", blow_up)
    with pytest.raises(FloatingPointError, match="not writing .*distill_inf.*NaN or inf"):
        run_distill(aligned, tmp_path, out="distill_inf", steps=8, save_every=1, log_every=4)
    model, info = M.load_checkpoint(os.path.join(tmp_path, "d", "distill_inf", "ckpt.pt"))
    assert info["metrics"]["step"] == 2 and all(torch.isfinite(p).all() for p in model.parameters())


def test_resume_equals_the_uninterrupted_run(aligned, tmp_path, monkeypatch):
    kw = dict(steps=6, save_every=2, untie=True, lr_other=1e-3)
    whole = run_distill(aligned, tmp_path, out="whole", **kw)
    real = distill.set_lr

    def killed(opt, step, warmup):
        if step == 5:
            raise KeyboardInterrupt("killed at step 6")
        return real(opt, step, warmup)
    monkeypatch.setattr(distill, "set_lr", killed)
    with pytest.raises(KeyboardInterrupt):
        run_distill(aligned, tmp_path, out="cut", **kw)
    monkeypatch.undo()
    info = M.checkpoint_info(os.path.join(tmp_path, "d", "cut", "ckpt.pt"))
    assert info["metrics"]["step"] == 4 and not info["complete"]
    resumed = run_distill(aligned, tmp_path, out="cut", resume=True, **kw)
    a, b = (torch.load(os.path.join(tmp_path, "d", o, "ckpt.pt"), weights_only=True)["model"] for o in ("whole", "cut"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for key in ("kl", "kl_first", "valid_kl", "valid_kl_untied"):
        assert resumed[key] == whole[key], key


def test_another_teacher_is_refused(aligned, tmp_path):
    """A teacher of the same shapes but other weights trains silently against the wrong model: refused unless asked
    for; one of another vocabulary is refused always."""
    other = tmp_path / "other"
    other.mkdir()
    write_tiny_llama(str(other), vocab_size=write_tokenizer(str(other), make_text(200)), seed=1)
    with pytest.raises(ValueError, match="not the teacher this checkpoint descends from.*--other_teacher=true"):
        run_distill(aligned, tmp_path, teacher=str(other), steps=1)
    assert run_distill(aligned, tmp_path, teacher=str(other), other_teacher=True, steps=1)["steps"] == 1
    small = tmp_path / "small"
    small.mkdir()
    write_tiny_llama(str(small), vocab_size=write_tokenizer(str(small), make_text(200), vocab_size=300))
    with pytest.raises(ValueError, match="cannot be this student's teacher: teacher vs student vocab_size 300 vs"):
        run_distill(aligned, tmp_path, teacher=str(small), other_teacher=True, steps=1)


@pytest.mark.parametrize("flag", ["batch_size", "steps", "seq_len", "chunk"])
def test_zero_sizes_are_refused_when_parsed(flag):
    from common import parse_args
    with pytest.raises(SystemExit, match=f"--{flag}=0: must be a positive integer"):
        parse_args(distill.Config, [f"--{flag}=0"])


def test_a_copied_run_reads_its_own_data(aligned, tmp_path, capsys):
    """A run folder copied elsewhere reads the copy's token files, not the original's (data_dir "" = the run's own
    data folder, resolved where the run is now), and says which data it reads."""
    import shutil
    copy = tmp_path / "moved"
    shutil.copytree(aligned.dir, copy / "tiny", ignore=shutil.ignore_patterns(".lock"))
    distill.main(distill.Config(run_name="tiny", out_dir=str(copy), layers="1", steps=1, valid_batches=1, **FAST))
    assert f"data: {copy / 'tiny' / 'data'} (" in capsys.readouterr().out


def test_the_step_profile_accounts_for_the_step(aligned):
    """bench_train --profile: the traced distill step's kernel groups add up to no more than its wall time, the
    matmuls are found, and the group rules send real kernel names of an H200 trace to their groups."""
    import bench_train
    cfg = bench_train.Config(profile=True, profile_steps=2)
    rows, wall, busy, rate, kernels, launches = bench_train.profile_distill(cfg, aligned.transfer_ckpt,
                                                                             aligned.teacher, 2, 16, "cpu")
    groups = {g: ms for g, ms, _ in rows}
    assert wall > 0 and 0 < busy <= 1.05 and groups.get("gemm", 0) > 0 and rate > 0
    assert abs(sum(groups.values()) - sum(ms for ms, *_ in kernels)) < 1e-6 and launches > 0
    assert [bench_train.group(n) for n in (
        "nvjet_tst_192x192_64x4_2x1_v_bz_coopA_TNT", "_chunk_output_kernel", "pytorch_flash::flash_fwd_kernel",
        "void at::native::multi_tensor_apply_kernel<FusedAdamMathFunctor>", "triton_red_fused__log_softmax_amax_0",
        "triton_poi_fused_mul_rsqrt_silu_1", "void at::native::elementwise_kernel<128, 2>")] == [
        "gemm", "GLA kernel", "softmax attention", "optimizer (fused AdamW)", "KL (log-softmax, exp, sums)",
        "inductor-fused (norms, rope, swiglu, gates)", "norms, copies, casts, fills"]


# ---------------------------------------------------------------------------------------------- the CUDA graph step

def test_graph_flag_is_checked(aligned, tmp_path):
    with pytest.raises(ValueError, match="choose auto, true or false"):
        distill.Config(graph="yes")
    with pytest.raises(ValueError, match="--graph=true needs the GPU"):
        run_distill(aligned, tmp_path, graph="true")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU (run on the device)")
def test_graphed_step_trains_as_the_eager_step(aligned, tmp_path, monkeypatch):
    """The step replayed as a CUDA graph gives the eager step's loss curve and weights: the lr warmup runs eagerly,
    3 more eager steps, then replays; a log line averages 4 steps, so a recorded output read without a copy (every
    step the same tensor) would change the curve."""
    replays = []
    real = torch.cuda.CUDAGraph.replay
    monkeypatch.setattr(torch.cuda.CUDAGraph, "replay", lambda g: (replays.append(1), real(g))[1])
    runs = {}
    for graph in ("false", "true"):
        run_distill(aligned, tmp_path / graph, steps=16, warmup=2, log_every=4, micro_batch=1, lr_mixer=3e-3,
                    lr_other=3e-4, device="cuda", graph=graph)
        out = tmp_path / graph / "d" / "distill"
        runs[graph] = ([json.loads(line)["kl"] for line in open(out / "log.jsonl")],
                       M.load_checkpoint(str(out / "ckpt.pt"))[0].state_dict())
    assert len(replays) == 16 - 2 - 3 + 1          # from the step after the warmup's last, the capture's included
    (eager, w_eager), (graphed, w_graphed) = runs["false"], runs["true"]
    assert graphed == pytest.approx(eager, rel=1e-3), (eager, graphed)
    for k in w_eager:
        torch.testing.assert_close(w_graphed[k], w_eager[k], rtol=1e-3, atol=1e-4, msg=k)
