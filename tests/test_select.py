"""select_layers.py on the tiny run: kl keeps the K lowest scores, uniform the block centres, ga_s1 the worst-aligned
Stage-1 layers, ablation the largest recall drops of the teacher; budgets rounded as the paper counts; errors."""

import json
import os
import sys
import types

import pytest
import torch

import select_layers
from common import parse_budget


def test_budgets_round_half_up_as_the_papers_configs():
    """K = ratio x L rounded half up: Qwen2.5-3B (36 layers) 5/9/12/18, Llama-3.2-3B (28) 4/7/9/14, SmolLM2 (30)
    4/8/10/15; counts stay counts."""
    for L, want in ((36, [5, 9, 12, 18]), (28, [4, 7, 9, 14]), (30, [4, 8, 10, 15])):
        assert [parse_budget(b, L) for b in ("0.125", "0.25", "0.33", "0.5")] == want, L
    assert parse_budget("12.5%", 36) == 5 and parse_budget("8", 30) == 8 and parse_budget("0.01", 30) == 1


def test_uniform_is_the_block_centres(aligned):
    """L = 30, K = 8: one layer per block of 30/8, at its centre (the README's 1 5 9 13 16 20 24 28)."""
    sel = select(aligned, method="uniform", budget="8", n_layers=30, out="u30.json")
    assert sel["layers"] == [1, 5, 9, 13, 16, 20, 24, 28]


def select(aligned, **kw):
    kw.setdefault("budget", "2")
    return select_layers.main(select_layers.Config(run_name="sel", out_dir=aligned.out, align=aligned.align_ckpt, **kw))


def test_select_methods(aligned, monkeypatch):
    scores = [0.5, 0.1, 0.9, 0.2]
    os.makedirs(os.path.join(aligned.out, "sel", "score"), exist_ok=True)
    with open(os.path.join(aligned.out, "sel", "score", "scores.json"), "w") as f:
        json.dump({"method": "kl", "n_layers": 4, "scores": scores}, f)
    sel = select(aligned, method="kl")
    assert sel["layers"] == [1, 3] and sel["n_layers"] == 4 and sel["budget"] == 2
    with open(os.path.join(aligned.out, "sel", "select", "selection.json")) as f:
        assert json.load(f) == sel

    assert select(aligned, method="uniform", budget="0.5", out="selection_uniform.json")["layers"] == [1, 3]
    assert select(aligned, method="uniform", budget="1", out="u1.json")["layers"] == [2]
    assert select(aligned, method="uniform", budget="4", out="u4.json")["layers"] == [0, 1, 2, 3]
    assert os.path.exists(os.path.join(aligned.out, "sel", "select", "selection_uniform.json"))

    losses = aligned.align["layer_losses"]
    sel = select(aligned, method="ga_s1", out="ga.json")
    assert sel["layers"] == sorted(sorted(range(4), key=lambda i: -losses[i])[:2])

    # ablation: a stand-in for eval.recall_accuracy that sees the hooks (zeroing layer 2 hurts most, then layer 0)
    calls = []

    def fake_recall(model, tok, task, length, n, seed, device):
        idx = torch.arange(1, 17, device=device)[None]
        with torch.no_grad():
            out = [layer.self_attn(layer.input_layernorm(model.model.embed_tokens(idx)),
                                   *model.rope(torch.arange(16, device=device))) for layer in model.model.layers]
        zeroed = [i for i, o in enumerate(out) if not o.any()]
        calls.append((task, length, n, zeroed))
        return {2: 0.2, 0: 0.5}.get(zeroed[0], 0.9) if zeroed else 1.0

    monkeypatch.setitem(sys.modules, "recall", types.SimpleNamespace(recall_accuracy=fake_recall))
    sel = select(aligned, method="ablation", out="abl.json", length=128, prompts=8)
    assert sel["layers"] == [0, 2] and sel["scores"] == pytest.approx([0.5, 0.1, 0.8, 0.1])
    assert [c[3] for c in calls] == [[], [0], [1], [2], [3]] and calls[0][:3] == ("mqar", 128, 8)


def test_select_ablation_with_eval(aligned):
    """The ablation through recall.py's real recall_accuracy (the random teacher scores 0: the plumbing is the
    point)."""
    sel = select(aligned, method="ablation", out="abl_real.json", length=512, prompts=2)
    assert len(sel["layers"]) == 2 and len(sel["scores"]) == 4 and 0 <= sel["base_accuracy"] <= 1


def test_select_errors(aligned, tmp_path):
    for budget, pattern in (("5", "only 4"), ("0", "positive"), ("-1", "positive"), ("1.5", "at most 1"),
                            ("lots", "fraction")):
        with pytest.raises(ValueError, match=pattern):
            select(aligned, method="uniform", budget=budget, out="x.json")
    with pytest.raises(ValueError, match="unknown"):
        select(aligned, method="random")
    with pytest.raises(FileNotFoundError, match="score.py"):
        select(aligned, method="kl", scores=str(tmp_path / "none.json"))
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps({"scores": [0.1, None, 0.3, 0.2]}))
    with pytest.raises(ValueError, match=r"\[1\]"):
        select(aligned, method="kl", scores=str(partial))


def test_cross_variant_selection_reads_another_runs_scores(aligned, tmp_path):
    """--scores=<another run's scores.json> (the paper's cross-variant probes: a GLA student given the layers a GDN
    run's probes chose): the K lowest of those scores, written beside this run's own selection, naming its source."""
    other = tmp_path / "gdn_run" / "score" / "scores.json"
    other.parent.mkdir(parents=True)
    other.write_text(json.dumps({"method": "kl", "n_layers": 4, "scores": [0.3, 0.9, 0.1, 0.8]}))
    sel = select(aligned, method="kl", scores=str(other), out="selection_gdn.json")
    assert sel["layers"] == [0, 2] and sel["source"] == str(other)
    with open(os.path.join(aligned.out, "sel", "select", "selection_gdn.json")) as f:
        assert json.load(f)["layers"] == [0, 2]
