"""align.py (Stage 1) on the tiny teacher: teacher forcing (every mixer reads the teacher's own stream), the loss form
(per-token RMS distance, not MSE), which parameters train (the mixers, all of them, nothing else), the NaN guard,
and --resume (an interrupted run continued equals the uninterrupted one)."""

import json
import math
import os

import pytest
import torch

import align
from model import checkpoint_info, load_checkpoint
from teachers import from_pretrained


def run_align(aligned, tmp_path, **kw):
    cfg = dict(run_name="a", out_dir=str(tmp_path), input=aligned.transfer_ckpt, data_dir=aligned.data_dir,
               steps=6, batch_size=2, seq_len=32, lr=3e-3, log_every=1, device="cpu", valid_batches=1)
    return align.main(align.Config(**{**cfg, **kw}))


def test_rms_distance_is_per_token_not_mse():
    """mean_t ||t - s||_2 / sqrt(D): two tokens of D = 4 differing by (4, 0, 0, 0) and by nothing give
    (4 + 0) / 2 / 2 = 1; plain MSE would give 16 / 8 = 2, its root 1.41."""
    t = torch.zeros(1, 2, 4)
    s = torch.tensor([[[4.0, 0, 0, 0], [0, 0, 0, 0]]])
    assert align.rms_distance(t, s).item() == pytest.approx(1.0)


def test_each_mixer_reads_the_teachers_stream_and_the_loss_is_the_rms_distance(aligned):
    """Teacher forcing: the input every mixer sees in align_losses is input_layernorm of the TEACHER's own residual
    stream at that layer (captured from a plain teacher forward), so layers are decoupled; and each layer's loss is
    the per-token RMS distance between the teacher's attention output and the mixer's output on that input."""
    teacher = from_pretrained(aligned.teacher).eval()
    student, _ = load_checkpoint(aligned.align_ckpt)
    mixers = [layer.self_attn for layer in student.model.layers]
    with torch.no_grad():  # mixers far from the teacher's attention: a student stream would differ visibly
        for m in mixers:
            m.o_proj.weight.mul_(3.0)
    idx = torch.randint(0, teacher.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    expected = []
    hooks = [layer.input_layernorm.register_forward_hook(lambda mod, a, out: expected.append(out))
             for layer in teacher.model.layers]
    with torch.no_grad():
        teacher(idx)
    for h in hooks:
        h.remove()
    seen = []
    hooks = [m.register_forward_hook(lambda mod, a, out: seen.append((a[0], out))) for m in mixers]
    with torch.no_grad():
        losses = align.align_losses(teacher, mixers, idx)
    for h in hooks:
        h.remove()
    cos, sin = teacher.rope(torch.arange(24))
    assert len(seen) == len(expected) == len(losses)
    for l, ((x, s), x_teacher) in enumerate(zip(seen, expected)):
        torch.testing.assert_close(x, x_teacher, msg=f"layer {l}: the mixer's input is not the teacher's stream")
        with torch.no_grad():
            t = teacher.model.layers[l].self_attn(x_teacher, cos, sin)
        by_hand = ((t - s) ** 2).sum(-1).sqrt().mean() / math.sqrt(t.shape[-1])
        torch.testing.assert_close(losses[l], by_hand)


def test_align_trains_every_mixer_parameter_and_nothing_else(aligned):
    m = aligned.align
    L = 4
    assert len(m["layer_losses"]) == L and all(math.isfinite(x) for x in m["layer_losses"])
    assert math.isfinite(m["valid_loss"]) and len(m["valid_layer_losses"]) == L
    with open(os.path.join(aligned.dir, "align", "log.jsonl")) as f:
        log = [json.loads(line) for line in f]
    assert len(log[0]["layer_losses"]) == L
    assert log[-1]["loss"] < 0.8 * log[0]["loss"], (log[0]["loss"], log[-1]["loss"])
    raw = torch.load(aligned.align_ckpt, map_location="cpu", weights_only=True)
    assert raw["stage"] == "align" and raw["config"]["teacher"] == aligned.teacher and raw["complete"]
    assert raw["metrics"]["layer_losses"] == pytest.approx(m["layer_losses"])
    t = torch.load(aligned.transfer_ckpt, map_location="cpu", weights_only=True)["model"]
    moved = {name for name, p in raw["model"].items() if not torch.equal(p, t[name])}
    mixer = {name for name in raw["model"] if ".self_attn." in name}
    assert moved == mixer, (moved ^ mixer)


def test_nan_stops_and_no_broken_checkpoint_is_published(aligned, tmp_path, monkeypatch):
    """A NaN loss stops the run at its step and names the last checkpoint written before it, whose weights are
    finite; an update that makes the weights non-finite is never written."""
    real, calls = align.align_losses, []

    def poisoned(*args):
        calls.append(1)
        return real(*args) * (float("nan") if len(calls) == 3 else 1.0)

    monkeypatch.setattr(align, "align_losses", poisoned)
    out = str(tmp_path / "nan" / "ckpt.pt")
    with pytest.raises(FloatingPointError, match=f"step 3.*{out}.*--resume=true.*a smaller --lr"):
        run_align(aligned, tmp_path, steps=5, save_every=2, output=out, compile="false")
    monkeypatch.undo()
    model, info = load_checkpoint(out)
    assert info["metrics"]["step"] == 2 and not info["complete"]
    assert all(torch.isfinite(p).all() for p in model.parameters())
    with pytest.raises(FileNotFoundError, match="transfer.py"):
        align.main(align.Config(run_name="missing", out_dir=aligned.out, device="cpu"))


def kill_at(monkeypatch, at):
    """align.lr_at raises at step `at` (0-based): the run dies there, as a killed process would."""
    real = align.lr_at

    def killed(step, cfg):
        if step == at:
            raise KeyboardInterrupt(f"killed at step {at + 1}")
        return real(step, cfg)
    monkeypatch.setattr(align, "lr_at", killed)


def test_resume_equals_the_uninterrupted_run(aligned, tmp_path, monkeypatch):
    whole = run_align(aligned, tmp_path, run_name="whole")
    kill_at(monkeypatch, 4)
    with pytest.raises(KeyboardInterrupt):
        run_align(aligned, tmp_path, run_name="cut", save_every=2)
    monkeypatch.undo()
    cut = os.path.join(tmp_path, "cut", "align", "ckpt.pt")
    assert checkpoint_info(cut)["metrics"]["step"] == 4 and not checkpoint_info(cut)["complete"]
    with pytest.raises(ValueError, match="other settings: --lr=0.001"):
        run_align(aligned, tmp_path, run_name="cut", save_every=2, resume=True, lr=1e-3)
    resumed = run_align(aligned, tmp_path, run_name="cut", save_every=2, resume=True)
    a = torch.load(os.path.join(tmp_path, "whole", "align", "ckpt.pt"), weights_only=True)
    b = torch.load(cut, weights_only=True)
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    assert resumed["layer_losses"] == whole["layer_losses"] and resumed["valid_loss"] == whole["valid_loss"]
    # a finished stage resumed again has nothing to do
    again = run_align(aligned, tmp_path, run_name="cut", save_every=2, resume=True)
    assert again["layer_losses"] == whole["layer_losses"]


def test_graph_flag_is_checked():
    with pytest.raises(ValueError, match="choose auto, true or false"):
        align.Config(graph="on")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU (run on the device)")
def test_graphed_step_trains_as_the_eager_step(aligned, tmp_path, monkeypatch):
    """The step replayed as a CUDA graph gives the eager step's per-layer losses at every step. The cosine lr falls
    from 3e-3 to 1e-5 over these 12 steps: a graph that kept the lr it was recorded with would drift from the eager
    curve."""
    replays = []
    real = torch.cuda.CUDAGraph.replay
    monkeypatch.setattr(torch.cuda.CUDAGraph, "replay", lambda g: (replays.append(1), real(g))[1])
    curves = {}
    for graph in ("false", "true"):
        run_align(aligned, tmp_path, run_name=graph, steps=12, micro_batch=1, device="cuda", graph=graph)
        with open(os.path.join(tmp_path, graph, "align", "log.jsonl")) as f:
            curves[graph] = [json.loads(line)["layer_losses"] for line in f]
    assert len(replays) == 12 - 3
    for eager, graphed in zip(curves["false"], curves["true"]):
        assert graphed == pytest.approx(eager, rel=1e-3, abs=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU (run on the device)")
def test_a_graphed_run_resumes_as_the_uninterrupted_one(aligned, tmp_path, monkeypatch):
    """Killed after step 8 (a mid-run checkpoint at 8), resumed: the resumed run warms up, records and replays
    again, with its lr tensor filled from the checkpoint, and ends with the uninterrupted graphed run's losses."""
    whole = run_align(aligned, tmp_path, run_name="whole", steps=12, device="cuda", graph="true")
    kill_at(monkeypatch, 8)
    with pytest.raises(KeyboardInterrupt):
        run_align(aligned, tmp_path, run_name="cut", steps=12, device="cuda", graph="true", save_every=4)
    monkeypatch.undo()
    resumed = run_align(aligned, tmp_path, run_name="cut", steps=12, device="cuda", graph="true", save_every=4,
                        resume=True)
    assert resumed["layer_losses"] == pytest.approx(whole["layer_losses"], rel=1e-3)
