"""The whole chain on the tiny teacher, each stage with its defaults chaining the paths: data -> transfer -> align ->
score -> select -> distill -> finetune -> eval, on the CPU."""

import os

import pytest

import align
import data
import distill
import eval as ev
import finetune
import model as M
import score
import select_layers
import transfer

FAST = dict(batch_size=2, seq_len=32, device="cpu")


@pytest.mark.parametrize("mixer", ["gla", "gdn"])
def test_full_chain(tiny_teacher, tiny_corpus, tmp_path, mixer):
    """data -> transfer -> align -> score -> select -> distill -> finetune -> eval with each stage's defaults
    chaining the paths: the only flags are sizes, and the student's mixer (chosen once, by transfer.py)."""
    common = dict(run_name="chain", out_dir=str(tmp_path))
    data.main(data.Config(data=tiny_corpus, teacher=tiny_teacher, **common))
    transfer.main(transfer.Config(teacher=tiny_teacher, mixer=mixer, **common))
    align.main(align.Config(steps=5, batch_size=2, seq_len=32, log_every=5, device="cpu", valid_batches=1, **common))
    score.main(score.Config(steps=4, eval_every=2, **FAST, **common))
    sel = select_layers.main(select_layers.Config(method="kl", budget="0.25", **common))
    d = distill.main(distill.Config(steps=3, valid_batches=1, **FAST, **common))
    assert d["layers"] == sel["layers"] and len(sel["layers"]) == 1
    finetune.main(finetune.Config(steps=2, batch_size=2, valid_batches=1, device="cpu", **common))
    model, ck = M.load_checkpoint(os.path.join(tmp_path, "chain", "finetune", "ckpt.pt"))
    assert ck["parent"].endswith(os.path.join("chain", "distill", "ckpt.pt")) and model.config.mixers.count("attn") == 1
    assert model.config.mixers.count(mixer) == 3
    ev.main(ev.Config(lengths="384", prompts=1, tasks="niah_single", ppl_seq_len=32, ppl_windows=2, batch_size=2,
                      speed="off", device="cpu", **common))
    assert os.path.exists(os.path.join(tmp_path, "chain", "eval", "eval.json"))
