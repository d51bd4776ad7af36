"""lm_eval_nanohybrid.py on a tiny hybrid, CPU only, no downloads: loglikelihood equal to the model's own logits,
batched greedy generation equal to generating each prompt alone, two tasks defined here through
lm_eval.simple_evaluate (a generation task and a multiple-choice one, whose answers are the model's own, so a
correct pipeline scores exactly 1), the CLI wrapper, and RULER's locally generated tasks with no network."""

import json
import os

import pytest
import torch
import torch.nn.functional as F

lm_eval = pytest.importorskip("lm_eval")

import lm_eval_nanohybrid as LE  # noqa: E402
import model as M  # noqa: E402
from teachers import from_pretrained  # noqa: E402
from tokenizer import load_tokenizer  # noqa: E402

PROMPTS = ["The cat", "the key value city river paris", "Code python linux kernel memory attention layer model",
           "One two three four five.", "data table number"]


@pytest.fixture(scope="module")
def hybrid(tiny_teacher, tmp_path_factory):
    """A checkpoint of the tiny teacher with GLA in layers 1 and 2 (random GLA weights)."""
    torch.manual_seed(0)
    student = from_pretrained(tiny_teacher)
    for i in (1, 2):
        student.set_mixer(i, M.GLA(student.config), "gla")
    path = str(tmp_path_factory.mktemp("hybrid") / "distill" / "ckpt.pt")
    M.save_checkpoint(path, student, stage="distill", config={"teacher": tiny_teacher}, parent=None, metrics={},
                      tokenizer=tiny_teacher)
    return path


@pytest.fixture(scope="module")
def lm(hybrid):
    return LE.NanoHybridLM(ckpt=hybrid, batch_size=3, device="cpu")


def request(*args):
    from lm_eval.api.instance import Instance
    return Instance("loglikelihood", {}, args, 0)


def direct_logprob(model, tok, context, continuation):
    """log p(continuation | context) from the model's full logits: the context's tokens are those of context
    alone (trailing spaces go with the continuation, as the harness does), the rest of the whole text's tokens are
    scored; an empty context is the BOS (else EOS) token."""
    n_space = len(context) - len(context.rstrip())
    context, continuation = context[:len(context) - n_space], context[len(context) - n_space:] + continuation
    whole = tok.encode(context + continuation)
    ctx = tok.encode(context) if context else [tok.bos_id if tok.bos_id is not None else tok.eos_id]
    if not context:
        whole = ctx + whole
    with torch.no_grad():
        logp = F.log_softmax(model(torch.tensor([whole[:-1]])).float()[0], -1)
    return sum(logp[p - 1, whole[p]].item() for p in range(len(ctx), len(whole)))


def test_loglikelihood_equals_the_logits(lm, hybrid):
    model, tok = M.load_checkpoint(hybrid)[0].eval(), load_tokenizer(hybrid)
    pairs = [("The cat", " sat"), ("the key value ", "city river"), ("", "Paris is a city"),
             ("Code python linux kernel memory attention layer model token state", " gate linear softmax")]
    got = lm.loglikelihood([request(c, x) for c, x in pairs])
    for (context, continuation), (logprob, _) in zip(pairs, got):
        assert logprob == pytest.approx(direct_logprob(model, tok, context, continuation), abs=1e-4), context
    # is_greedy: a continuation made of the model's own greedy tokens is greedy, another one is not
    ids = tok.encode("the cat")
    with torch.no_grad():
        for _ in range(3):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    greedy = tok.decode(ids[len(tok.encode("the cat")):])
    if tok.encode("the cat" + greedy) == ids:  # the tokenization round-trips, so the harness scores these ids
        assert lm.loglikelihood([request("the cat", greedy)])[0][1] is True


def test_rolling_loglikelihood_over_windows(hybrid):
    """A text within max_length is one window: the logits' log-probability of every token after the prefix token. A
    longer one is the sum over the harness's disjoint windows (lm_eval.utils), each scored from the full logits."""
    from lm_eval.api.instance import Instance
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
    text = " ".join(PROMPTS * 3)
    rolling = lambda lm: lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])[0]
    whole = LE.NanoHybridLM(ckpt=hybrid, batch_size=2, device="cpu")
    model, tok = whole.model, whole.tok
    assert rolling(whole) == pytest.approx(direct_logprob(model, tok, "", text), abs=1e-3)
    want = 0.0
    with torch.no_grad():
        for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(tok.encode(text), whole.prefix_token_id,
                                                                              16, 1)):
            ids = ctx + cont
            logp = F.log_softmax(model(torch.tensor([ids[:-1]])).float()[0], -1)
            want += sum(logp[p - 1, ids[p]].item() for p in range(len(ctx), len(ids)))
    assert rolling(LE.NanoHybridLM(ckpt=hybrid, batch_size=2, device="cpu", max_length=16)) == pytest.approx(
        want, abs=1e-3)


def test_batched_generation_equals_one_at_a_time(lm, hybrid):
    """Prompts of different lengths in one batch give what each gives alone through model.generate."""
    model, tok = lm.model, lm.tok
    got = lm.greedy([tok.encode(p) for p in PROMPTS], 12)
    for prompt, tokens in zip(PROMPTS, got):
        ids = torch.tensor([tok.encode(prompt)])
        alone = M.generate(model, ids, 12, eos_id=tok.stop_ids[-1])[0, ids.shape[1]:].tolist()
        end = min([alone.index(t) for t in tok.stop_ids if t in alone], default=len(alone))
        assert tokens == alone[:end], prompt


def test_generate_until_cuts_at_stop_strings(lm):
    from lm_eval.api.instance import Instance
    free = lm.generate_until([Instance("generate_until", {}, (p, {"max_gen_toks": 10, "until": []}), 0)
                              for p in PROMPTS])
    stop = next(t for t in free if len(t.strip()) > 3).strip()[2:4]
    cut = lm.generate_until([Instance("generate_until", {}, (p, {"max_gen_toks": 10, "until": [stop]}), 0)
                             for p in PROMPTS])
    assert cut == [t.split(stop)[0] for t in free]
    with pytest.raises(ValueError, match="greedily"):
        lm.generate_until([Instance("generate_until", {}, ("x", {"do_sample": True, "temperature": 0.8}), 0)])


def test_clear_errors(hybrid):
    with pytest.raises(ValueError, match="ckpt="):
        LE.NanoHybridLM(device="cpu")
    with pytest.raises(ValueError, match="batch_size"):
        LE.NanoHybridLM(ckpt=hybrid, batch_size="auto", device="cpu")


def write_tasks(folder, lm):
    """Two tasks defined here on local JSON files: `tiny_gen` (generate_until; its targets are the model's own greedy
    continuations) and `tiny_mc` (multiple choice; the right choice is the one the model scores highest)."""
    from lm_eval.api.instance import Instance
    gen = lm.generate_until([Instance("generate_until", {}, (p, {"max_gen_toks": 6, "until": ["\n"]}), 0)
                             for p in PROMPTS])
    choices = [" cat", " dog", " key"]
    scores = [[s for s, _ in lm.loglikelihood([request(p, c) for c in choices])] for p in PROMPTS]
    rows = {"gen": [{"prompt": p, "target": t} for p, t in zip(PROMPTS, gen)],
            "mc": [{"prompt": p, "choices": choices, "label": max(range(3), key=s.__getitem__)}
                   for p, s in zip(PROMPTS, scores)]}
    for name, docs in rows.items():
        with open(os.path.join(folder, f"{name}.jsonl"), "w") as f:
            f.writelines(json.dumps(d) + "\n" for d in docs)
    common = f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {folder}/{{}}.jsonl\ntest_split: test\n"
    with open(os.path.join(folder, "tiny_gen.yaml"), "w") as f:
        f.write("task: tiny_gen\n" + common.format("gen") + "output_type: generate_until\ndoc_to_text: '{{prompt}}'\n"
                "doc_to_target: '{{target}}'\ntarget_delimiter: ''\ngeneration_kwargs:\n  until: ['\\n']\n"
                "  max_gen_toks: 6\n  do_sample: false\nmetric_list:\n  - metric: exact_match\n")
    with open(os.path.join(folder, "tiny_mc.yaml"), "w") as f:
        f.write("task: tiny_mc\n" + common.format("mc") + "output_type: multiple_choice\ndoc_to_text: '{{prompt}}'\n"
                "doc_to_choice: '{{choices}}'\ndoc_to_target: label\ntarget_delimiter: ''\n"
                "metric_list:\n  - metric: acc\n")
    return folder


def test_simple_evaluate_on_tasks_defined_here(lm, tmp_path):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    folder = write_tasks(str(tmp_path), lm)
    manager = TaskManager(include_path=folder, include_defaults=False)  # indexing lm_eval's own tasks takes 30 s
    out = simple_evaluate(model=lm, tasks=["tiny_gen", "tiny_mc"], task_manager=manager)
    assert out["results"]["tiny_gen"]["exact_match,none"] == 1.0
    assert out["results"]["tiny_mc"]["acc,none"] == 1.0


def test_cli_wrapper_registers_and_runs(hybrid, lm, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(LE, "CACHE", str(tmp_path / "cache"))
    import lm_eval.tasks
    manager = lm_eval.tasks.TaskManager  # the CLI's, without indexing lm_eval's own 30 s of tasks
    monkeypatch.setattr(lm_eval.tasks, "TaskManager", lambda **kw: manager(**{**kw, "include_defaults": False}))
    folder = write_tasks(str(tmp_path), lm)
    LE.main(["--model", "nanohybrid", "--model_args", f"ckpt={hybrid}", "--tasks", "tiny_mc", "--include_path",
             folder, "--device", "cpu", "--batch_size", "4", "--output_path", str(tmp_path / "results")])
    printed = capsys.readouterr().out
    assert "tiny_mc" in printed and "nanohybrid" in printed
    with pytest.raises(SystemExit, match="ckpt="):
        LE.main(["--model", "nanohybrid", "--tasks", "tiny_mc", "--include_path", folder])


def test_ruler_offline(lm, hybrid, tmp_path, monkeypatch):
    """RULER's locally generated tasks through the harness with no network: the tokenizer folder written from the
    model's own tokenizer, nltk's punkt_tab from the cache (written there when nltk has none)."""
    pytest.importorskip("wonderwords")
    pytest.importorskip("nltk")
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setattr(LE, "CACHE", str(tmp_path / "cache"))
    import nltk
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path / "no_nltk_data")])  # as on a machine without punkt_tab
    monkeypatch.setattr(nltk, "download", lambda *a, **k: pytest.fail("nltk tried to download"))
    assert LE.punkt_offline() is not None and LE.punkt_offline() is None  # written once, then found
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    meta = {"tokenizer": LE.hf_tokenizer_dir(hybrid), "max_seq_lengths": [512]}
    ruler = os.path.join(os.path.dirname(lm_eval.__file__), "tasks", "ruler")
    manager = TaskManager(include_path=ruler, include_defaults=False, metadata=meta)
    # (ruler_vt is left out: at 512 tokens of this tiny tokenizer its few-shot example never fits, and the harness's
    # sample loop does not end)
    out = simple_evaluate(model=lm, tasks=["niah_single_1"], limit=2, task_manager=manager)
    assert 0.0 <= out["results"]["niah_single_1"]["512,none"] <= 1.0, out["results"]
