"""score.py on the tiny teacher: resuming without recomputing (and what identifies the input: its weights, not its
timing), the early-stop rule (the top-K SET of every budget, not the order inside it nor the whole ranking) on
scripted KL curves, and selection reading the scores."""

import collections
import json
import os
import shutil

import pytest
import torch

import model as M
import score
import select_layers

FAST = dict(batch_size=2, seq_len=32, device="cpu")


def scores_of(folder, run_name):
    with open(os.path.join(folder, run_name, "score", "scores.json")) as f:
        return json.load(f)


def run_score(aligned, out, run_name="s", **kw):
    cfg = dict(run_name=run_name, out_dir=str(out), input=aligned.align_ckpt, data_dir=aligned.data_dir, steps=6,
               eval_every=2, patience=0, **FAST)
    return score.main(score.Config(**{**cfg, **kw}))


def test_score_resumes_without_recomputing(aligned, tmp_path):
    first = run_score(aligned, tmp_path, layers="0,1")
    assert first["scored"] == [0, 1] and not first["complete"]
    rec = scores_of(tmp_path, "s")
    assert rec["scores"][2] is None and rec["layers"]["0"]["finished"] and len(rec["layers"]["0"]["curve"]) == 6
    second = run_score(aligned, tmp_path)
    assert second["skipped"] == [0, 1] and second["scored"] == [2, 3] and second["complete"]
    third = run_score(aligned, tmp_path)
    assert third["scored"] == [] and third["skipped"] == [0, 1, 2, 3] and third["ranking"] == second["ranking"]
    rec = scores_of(tmp_path, "s")
    # a layer cut off mid-run (stored unfinished) is scored again, from the same batches to the same curve
    cut = json.loads(json.dumps(rec))
    cut["layers"]["2"].update(finished=False, curve=cut["layers"]["2"]["curve"][:2])
    with open(os.path.join(tmp_path, "s", "score", "scores.json"), "w") as f:
        json.dump(cut, f)
    fourth = run_score(aligned, tmp_path)
    assert fourth["scored"] == [2] and scores_of(tmp_path, "s")["layers"]["2"]["curve"] == rec["layers"]["2"]["curve"]
    assert all(s is not None and s > 0 for s in rec["scores"]) and sorted(rec["ranking"]) == [0, 1, 2, 3]
    # the same batches for every probe: grouped probes reproduce the resumed curves exactly
    grouped = run_score(aligned, tmp_path, run_name="grouped", max_probes=3)
    other = scores_of(tmp_path, "grouped")
    for l in "0123":
        assert other["layers"][l]["curve"] == rec["layers"][l]["curve"], l
    assert grouped["ranking"] == second["ranking"]
    # select_layers reads the scores: the K lowest
    sel = select_layers.main(select_layers.Config(run_name="s", out_dir=str(tmp_path), align=aligned.align_ckpt,
                                                  method="kl", budget="0.5"))
    assert sel["layers"] == sorted(rec["ranking"][:2])


def test_the_input_is_known_by_its_weights_not_its_timing(aligned, tmp_path):
    """Rewriting the Stage-1 checkpoint with other metrics (a rerun that took another number of minutes) keeps the
    scores; other weights start afresh."""
    ckpt = str(tmp_path / "align" / "ckpt.pt")
    os.makedirs(os.path.dirname(ckpt))
    shutil.copy(aligned.align_ckpt, ckpt)
    run_score(aligned, tmp_path, input=ckpt, layers="0", steps=2)
    student, info = M.load_checkpoint(ckpt)
    save = lambda m: M.save_checkpoint(ckpt, m, stage="align", config=info["config"], parent=info["parent"],  # noqa
                                       metrics={**info["metrics"], "minutes": 99.0}, tokenizer=info["tokenizer"],
                                       teacher=info["teacher"])
    save(student)
    assert run_score(aligned, tmp_path, input=ckpt, layers="0", steps=2)["skipped"] == [0]
    with torch.no_grad():
        student.model.layers[2].self_attn.o_proj.weight.mul_(1.01)
    save(student)
    assert run_score(aligned, tmp_path, input=ckpt, layers="0", steps=2)["scored"] == [0]
    assert os.path.exists(os.path.join(tmp_path, "s", "score", "scores.json.old"))


def scripted(monkeypatch):
    """Replace each probe's Stage-2 step by a scripted KL: the top-2 SET is always {0, 1}, but in every other round
    0 and 1 swap places, and so do 2 and 3 (the order inside and outside the top-2 changes, the set never)."""
    count = collections.Counter()

    def fake(forward, student, batches, t_head, opt, clip, device, chunk):
        layer = student.config.mixers.index("attn")
        k = count[layer]
        count[layer] += 1
        even = {0: 0.1, 1: 0.2, 2: 0.5, 3: 0.6}
        odd = {0: 0.2, 1: 0.1, 2: 0.6, 3: 0.5}
        return torch.tensor((even if (k // 2) % 2 == 0 else odd)[layer])
    monkeypatch.setattr(score, "stage2_step", fake)


@pytest.mark.parametrize("budget, stops_at", [("2", 6), ("0.5", 6), ("1,2", None), ("2,3", None)])
def test_early_stop_watches_the_top_k_set_of_every_budget(aligned, tmp_path, monkeypatch, budget, stops_at):
    """patience 2, rounds of 2 steps, score = the last step's KL: with budget K = 2 the set {0, 1} is the same after
    rounds 1, 2, 3, so the probes stop at step 6 although the ranking's order changes every round. With budgets
    K = 1 and 2 together (or 2 and 3) the top-1 (top-3) set changes every round: no early stop."""
    scripted(monkeypatch)
    m = run_score(aligned, tmp_path, run_name=f"es{budget}", budget=budget, steps=20, eval_every=2, patience=2,
                  late_frac=0.05)
    rec = scores_of(tmp_path, f"es{budget}")
    assert m["stopped_at"] == stops_at and m["early_stopped"] == (stops_at is not None)
    for l in "0123":
        assert rec["layers"][l]["steps"] == (stops_at or 20) and rec["layers"][l]["finished"]
        assert rec["layers"][l]["early_stopped"] == (stops_at is not None)


def test_early_stop_on_stable_top_k_with_real_probes(aligned, tmp_path):
    """budget 1.0: the top-K set is all layers, so it is stable from the second round and the probes stop; a
    rerun skips the finished layers."""
    m = run_score(aligned, tmp_path, run_name="es", budget="1.0", steps=10, eval_every=1, patience=2)
    rec = scores_of(tmp_path, "es")
    assert m["early_stopped"] and m["stopped_at"] == 3
    for l in "0123":
        assert rec["layers"][l]["early_stopped"] and rec["layers"][l]["stopped_at"] == 3
        assert len(rec["layers"][l]["curve"]) == 3
    again = run_score(aligned, tmp_path, run_name="es", budget="1.0", steps=10, eval_every=1, patience=2)
    assert again["skipped"] == [0, 1, 2, 3]


def test_a_second_scorer_of_the_same_run_is_refused(aligned, tmp_path):
    """Two score.py on one run would each score every layer (and each size its probes to the whole memory)."""
    folder = tmp_path / "s" / "score"
    folder.mkdir(parents=True)
    (folder / ".lock").write_text(json.dumps({"pid": 1, "host": os.uname().nodename, "what": "score.py"}))
    with pytest.raises(RuntimeError, match=r"being written by another process \(score.py, pid 1"):
        run_score(aligned, tmp_path, layers="0", steps=2)


def test_graph_flag_is_checked():
    with pytest.raises(ValueError, match="choose auto, true or false"):
        score.Config(graph="yes")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU (run on the device)")
def test_graphed_probes_score_as_eager_ones(aligned, tmp_path, monkeypatch):
    """Each resident probe's step replayed as a CUDA graph (3 eager steps, then the capture; one memory pool for
    the probes of a group) gives the eager probes' curves, in one group or in three; a probe parked in CPU memory
    between turns keeps the eager step."""
    replays = []
    real = torch.cuda.CUDAGraph.replay
    monkeypatch.setattr(torch.cuda.CUDAGraph, "replay", lambda g: (replays.append(1), real(g))[1])
    curves = {}
    for graph in ("false", "true"):
        run_score(aligned, tmp_path / graph, layers="0,1,2", steps=8, eval_every=4, micro_batch=1, device="cuda",
                  graph=graph)
        layers = scores_of(tmp_path / graph, "s")["layers"]
        curves[graph] = {l: layers[l]["curve"] for l in layers}
    assert len(replays) == 3 * (8 - 3)
    for l in curves["false"]:
        assert curves["true"][l] == pytest.approx(curves["false"][l], rel=1e-3), l
    # one probe per group, three groups: each group records into a pool of its own (session 8's Qwen score failed
    # at the second group's first capture when the first group's pool was reused)
    replays.clear()
    run_score(aligned, tmp_path / "groups", layers="0,1,2", steps=8, eval_every=4, micro_batch=1, device="cuda",
              graph="true", offload="false", max_probes=1)
    assert len(replays) == 3 * (8 - 3)
    layers = scores_of(tmp_path / "groups", "s")["layers"]
    for l in curves["false"]:
        assert layers[l]["curve"] == pytest.approx(curves["false"][l], rel=1e-3), l
    replays.clear()
    run_score(aligned, tmp_path / "parked", layers="0,1,2", steps=8, eval_every=4, device="cuda", offload="true")
    assert not replays                               # every probe parked: none is graphed


def test_out_of_memory_in_a_probe_says_what_to_change(aligned, tmp_path, monkeypatch):
    """A probe step out of memory (on a GPU: another process took what the plan counted on) stops with the flags
    that fit it, not PyTorch's bare error; the layers finished before stay in scores.json."""
    run_score(aligned, tmp_path, layers="0")

    def oom(*args, **kw):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 520.00 MiB.")
    monkeypatch.setattr(score, "stage2_step", oom)
    with pytest.raises(RuntimeError, match=r"out of memory in the layer-1 probe's step.*--max_probes=1"):
        run_score(aligned, tmp_path, layers="1")
    assert list(scores_of(tmp_path, "s")["layers"]) == ["0"]
