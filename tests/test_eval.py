"""eval.py on tiny models, CPU only: the recall prompts (length, answers inside, depth, determinism), the scoring
(an oracle that reads the answer out of the prompt scores 1, random text scores ~0), and main() end to end on a tiny
random teacher and two hybrids, checking what eval.json holds."""

import json
import math
import os
import random
import re

import pytest
import torch

import data
import eval as ev
import model as M
from teachers import from_pretrained
import recall
from conftest import make_text, write_tiny_llama, write_tokenizer
from tokenizer import load_tokenizer


class ByteTok:
    """A stand-in tokenizer, one token per byte, no chat format: make_prompts needs nothing more."""
    is_chat, eos_id, n_vocab = False, None, 256
    encode = staticmethod(lambda s: list(s.encode()))
    decode = staticmethod(lambda ids: bytes(ids).decode(errors="replace"))


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matmuls run faster on one thread, and much faster when other jobs share the cores (no spin-waiting)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A tiny random Llama whose BPE has seen the recall templates, so that a 256-token prompt leaves room for a
    haystack (the shared tiny tokenizer spends ~1 token per character on them)."""
    d = str(tmp_path_factory.mktemp("eval_teacher"))
    texts = [p["prompt"] for t in recall.TASKS for p in recall.make_prompts(t, ByteTok(), 4000, 5, seed=99)]
    write_tiny_llama(d, write_tokenizer(d, make_text(200) + texts, vocab_size=1000))
    return d


@pytest.fixture(scope="module")
def tok(teacher):
    return load_tokenizer(teacher)


def oracle(prompts):
    """A 'model' that copies the right answer: it reads the question in the prompt and looks the answer up there."""
    outs = []
    for p in prompts:
        text = p["prompt"]
        if "magic number" in text:
            keys = re.split(r", | and ", re.search(r"for (\S.*) mentioned in the provided text (is|are):$", text)[1])
            vals = [v for k in keys for v in re.findall(rf"numbers for {re.escape(k)} is: (\d+)\.", text)]
        elif "VAR " in text:
            value = re.search(r"assigned the value (\d+), they are:$", text)[1]
            chain = [re.search(rf"VAR (\w+) = {value}\.", text)[1]]
            while m := re.search(rf"VAR (\w+) = VAR {chain[-1]}\.", text):
                chain.append(m[1])
            vals = chain
        else:
            keys = re.split(r", | and ", re.search(r"values of the keys (\S.*) are:$", text)[1])
            vals = [re.search(rf"^{re.escape(k)}: (\d+)$", text, re.M)[1] for k in keys]
        outs.append(" " + ", ".join(vals) + ".")
    return outs


@pytest.mark.parametrize("task", recall.TASKS)
def test_prompts_length_answers_depth(tok, task):
    for length in (256, 512):
        prompts = recall.make_prompts(task, tok, length, n=10, seed=0)
        assert [p["depth"] for p in prompts] == list(recall.DEPTHS) * 2
        for p in prompts:
            n = len(tok.encode(p["prompt"]))
            assert n == p["n_tokens"] and length * 0.95 - 16 <= n <= length, (task, length, n)
            assert p["answers"] and all(a in p["prompt"] for a in p["answers"])
        # deterministic for a seed, different for another
        assert recall.make_prompts(task, tok, length, n=10, seed=0) == prompts
        assert recall.make_prompts(task, tok, length, n=10, seed=1)[0]["prompt"] != prompts[0]["prompt"]
    # the haystack tasks hit the requested length to the token, whatever the tokenizer
    if task != "mqar":
        assert all(p["n_tokens"] == 1000 for p in recall.make_prompts(task, ByteTok(), 1000, n=5))


def test_mqar_fits_when_whole_lines_overshoot():
    """mqar's context grows by whole key: value lines, so a prompt can overshoot its length by one token at every
    haystack size the -1 steps try (the study's 4096-token eval with SmolLM2's tokenizer did, at prompt 50);
    make_prompts must then bisect down to the longest prompt that fits, not give up."""
    for length in (552, 848):   # lengths where ByteTok's line steps hit exactly that
        prompts = recall.make_prompts("mqar", ByteTok(), length, n=20, seed=0)
        assert all(length * 0.95 - 16 <= p["n_tokens"] <= length for p in prompts), length


class MergeTok(ByteTok):
    """ByteTok, but " ." is one token and " .\n" too, as in Qwen2's BPE: the filler before the question loses one."""
    encode = staticmethod(lambda s: list(s.replace(" .\n", "\x01").replace(" .", "\x02").encode()))


def test_filler_makes_prompts_exact_when_the_tokenizer_merges_it():
    for length in (552, 848, 1000):
        prompts = recall.make_prompts("mqar", MergeTok(), length, n=20, seed=0)
        assert [p["n_tokens"] for p in prompts] == [length] * 20, length
        assert all(len(MergeTok.encode(p["prompt"])) == length for p in prompts)


def test_needle_depth_and_chat_format(tok):
    prompts = recall.make_prompts("niah_single", tok, 512, n=5)
    where = [p["prompt"].index(p["answers"][0]) for p in prompts]
    assert where == sorted(where) and where[-1] - where[0] > len(prompts[0]["prompt"]) // 2
    assert tok.is_chat and all(p["prompt"].startswith("<|im_start|>") for p in prompts)


def test_too_short_is_a_clear_error(tiny_teacher):
    with pytest.raises(ValueError, match="too short"):
        recall.make_prompts("niah_multiquery", load_tokenizer(tiny_teacher), 64, n=1)


def test_scoring_oracle_random_partial(tok):
    rng = random.Random(0)
    noise = lambda prompts: [tok.decode([rng.randrange(tok.n_vocab) for _ in range(40)]) for _ in prompts]
    for task in recall.TASKS:
        prompts = recall.make_prompts(task, tok, 512, n=10)
        s = recall.score_task(oracle, prompts)
        assert s["acc"] == 1.0 and set(s["by_depth"]) == {str(d) for d in recall.DEPTHS}, task
        assert recall.score_task(noise, prompts)["acc"] <= 0.1, task
    for score in (recall.string_match_all, recall.whole_word):
        assert score("The numbers are 1234 and  99.", ["1234", "5678"]) == 0.5
        assert score(" abcde, FGHIJ", ["ABCDE", "FGHIJ"]) == 1.0
    # RULER's string_match_all is a substring test; whole_word is not
    assert recall.string_match_all("12345678", ["1234567"]) == 1.0
    assert recall.whole_word("12345678", ["1234567"]) == 0.0
    s = recall.score_task(lambda ps: ["It is 12345678."] * len(ps), [dict(answers=["1234567"], depth=0.0)])
    assert (s["acc"], s["whole_word"]) == (1.0, 0.0)


def test_recall_accuracy_on_tiny_model(teacher, tok):
    model = from_pretrained(teacher).eval()
    acc = recall.recall_accuracy(model, tok, task="mqar", length=256, n=3, seed=0, device="cpu")
    assert isinstance(acc, float) and 0.0 <= acc <= 0.5


def test_main_end_to_end(teacher, tiny_corpus, tmp_path, capsys):
    out = str(tmp_path)
    data.main(data.Config(run_name="tiny", out_dir=out, data=tiny_corpus, teacher=teacher))
    # two hybrids of the random teacher saved as a run's distill stages (the default checkpoints eval finds)
    for folder, gla in (("distill", (1, 2, 3)), ("distill_uniform", (0, 2))):
        student = from_pretrained(teacher)
        for i in gla:
            student.set_mixer(i, M.GLA(student.config), "gla")
        M.save_checkpoint(os.path.join(out, "tiny", folder, "ckpt.pt"), student, stage="distill",
                          config={"teacher": teacher}, parent=None, metrics={}, tokenizer=teacher)
    # 576 is past the tiny teacher's max_position_embeddings (512): measured, said first, marked
    cfg = ev.Config(run_name="tiny", out_dir=out, lengths="256,576", prompts=2, ppl_seq_len=64, ppl_windows=4,
                    batch_size=2, speed="on", speed_lengths="32,64", speed_batch=2, decode_tokens=4, device="cpu")
    report = ev.main(cfg)
    printed = capsys.readouterr().out

    # the config is printed resolved (teacher and data_dir inherited), the extrapolation note before any work
    config = printed[printed.index("config (eval):"):printed.index("evaluating:")]
    assert f"teacher = {teacher!r}" in config and f"data_dir = {os.path.join(out, 'tiny', 'data')!r}" in config
    assert printed.index("past the teacher's max_position_embeddings=512") < printed.index("recall prompts")
    assert "teacher | recall 24/24 prompts" in printed  # progress counts the prompts of each model

    with open(os.path.join(out, "tiny", "eval", "eval.json")) as f:
        saved = json.load(f)
    assert set(saved) == {"settings", "models", "summary", "notes", "plots"}
    assert saved["settings"]["teacher_source"] == teacher and saved["settings"]["lengths"] == [256, 576]
    assert saved["settings"]["past_max_pos"] == [576]
    assert list(saved["models"]) == ["teacher", "distill", "distill_uniform"]
    assert saved["models"] == json.loads(json.dumps(report["models"]))
    t, s = saved["models"]["teacher"], saved["models"]["distill"]
    assert t["kl"] == 0.0 and s["kl"] > 0 and all(math.isfinite(m["ppl"]) and m["ppl"] > 1 for m in (t, s))
    assert s["mixers"] == ["attn", "gla", "gla", "gla"]
    for m in saved["models"].values():
        r = m["recall"]
        assert set(r) == {"avg", "by_task", "by_length", "by_task_length", "by_depth", "examples", "whole_word",
                          "past_max_pos"}
        assert set(r["by_task"]) == set(recall.TASKS) and set(r["by_length"]) == {"256", "576"}
        assert r["past_max_pos"] == ["576"] and 0.0 <= r["whole_word"]["avg"] <= r["avg"] <= 1.0
        assert len(m["speed"]) == 4 and all(x["status"] == "ok" for x in m["speed"])
    # the cache: KV buffers only for softmax layers, a fixed fp32 state [B, H, K, V] for each GLA layer
    for r in s["speed"]:
        B, T = r["batch"], r["length"] + 2 + cfg.decode_tokens  # 2 untimed steps: warm-up, graph recording
        assert r["gla_state_bytes"] == 3 * B * 4 * 16 * 16 * 4
        assert r["kv_bytes"] == 1 * 2 * B * 2 * T * 16 * 4
        assert r["vs_teacher"]["cache_ratio"] < 1
    assert "ppl" in saved["summary"] and "  whole words" in saved["summary"]
    assert "  @576 (past max_pos)" in saved["summary"] and "  @256" in saved["summary"]
    assert any("past the teacher's max_position_embeddings" in n for n in saved["notes"])
    assert any(k.startswith("decode tok/s B=2") for k in saved["summary"])
    assert any("CPU" in n for n in saved["notes"])


def test_each_prompt_is_cut_at_its_own_budget(monkeypatch):
    """Prompts that share a generate call run to the largest budget, but each output is cut at its own: a model
    that writes the answer late scores the same whichever prompts shared its batch."""
    tok = ByteTok()
    tok.stop_ids = [0]
    short = dict(prompt="xyz", answers=["42"])
    long_ = dict(prompt="xyz", answers=["1234567", "2345678", "3456789", "4567890"])
    late = 2 * len(tok.encode(" 42")) + 16  # the short prompt's budget: its answer comes one token too late

    def rambling(model, idx, n, eos_id=None):
        tail = (tok.encode("a" * late + " 42") + [ord("a")] * n)[:n]
        return torch.cat([idx, torch.tensor([tail] * len(idx))], 1)
    monkeypatch.setattr(recall, "generate", rambling)
    alone = recall.make_generate_fn(None, tok, "cpu", batch_size=1)([short, long_])
    together = recall.make_generate_fn(None, tok, "cpu", batch_size=2)([short, long_])
    assert alone == together and "42" not in together[0] and "42" in together[1]


@pytest.mark.parametrize("flags,error", [
    (dict(prompts=0), "--prompts=0: must be at least 1"), (dict(lengths=""), "--lengths=''"),
    (dict(lengths="1k"), "positive integers"), (dict(tasks="niah_single,ruler"), r"unknown recall task.*'ruler'"),
    (dict(depths="0,2"), "between 0 and 1"), (dict(speed="yes"), "auto, on or off"),
    (dict(batch_size=0), "--batch_size=0"), (dict(models="nowhere/ckpt.pt"), "do not exist")])
def test_bad_flags_are_clear_errors(tmp_path, flags, error):
    with pytest.raises((ValueError, FileNotFoundError), match=error):
        ev.main(ev.Config(run_name="x", out_dir=str(tmp_path), device="cpu", **flags))
    assert not os.path.exists(tmp_path / "x")  # refused before anything ran or was written


def test_lm_eval_ruler_in_the_table(teacher, tmp_path, monkeypatch):
    """--lm_eval runs the harness's RULER tasks for each model at each length, into eval.json and the table."""
    pytest.importorskip("lm_eval")
    pytest.importorskip("wonderwords")
    import lm_eval_nanohybrid
    monkeypatch.setattr(lm_eval_nanohybrid, "CACHE", str(tmp_path / "cache"))
    import lm_eval.tasks
    real = lm_eval.tasks.TaskManager
    with monkeypatch.context() as m:  # the index of all the harness's tasks (half a minute here) reduced to two
        m.setattr(lm_eval.tasks, "TaskManager", lambda include_path=None, include_defaults=True, **kw: real(
            include_path=include_path or lm_eval_nanohybrid.ruler_folder(), include_defaults=False, **kw))
        with pytest.raises(ValueError, match=r"unknown task\(s\) \['nosuch'\]"):
            ev.main(ev.Config(run_name="t", out_dir=str(tmp_path), teacher=teacher, tasks="",
                              lm_eval="niah_single_1,nosuch", device="cpu"))
    report = ev.main(ev.Config(run_name="t", out_dir=str(tmp_path), teacher=teacher, tasks="", lengths="512",
                               lm_eval="niah_single_1", lm_eval_limit=1, speed="off", device="cpu"))
    assert 0.0 <= report["models"]["teacher"]["lm_eval"]["niah_single_1"]["512"] <= 1.0
    assert "niah_single_1 @512" in report["summary"]
