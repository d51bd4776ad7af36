"""
The synthetic long-context recall suite of eval.py (and of select_layers.py's ablation method): RULER-style prompts
generated here with the teacher's tokenizer, so no download, and the same prompts for every model. Each prompt is
trimmed by tokens to the requested length (template and chat format included), the model answers greedily after an
answer prefix, and a prompt scores the fraction of its expected answers found in the output, two ways:

    string_match_all  RULER's score: answer a counts when a.lower() is a substring of output.lower() (0 or 1 for
                      one-answer tasks, k/4 for four-answer ones); "12345678" counts for the answer "1234567"
    whole_word        the same fraction, but an answer counts only as a whole word ("12345678" does not count)
The headline number (acc, avg) is string_match_all, so it compares with RULER's; whole_word is reported beside it.
    niah_single      "One of the special magic numbers for <key> is: <7 digits>." in a haystack
    niah_multikey    the same with 3 distractor needles of other keys
    niah_multivalue  4 numbers for one key, all asked
    niah_multiquery  4 keys with a number each, all asked at once
    vt               variable tracking: VAR A = 12345, VAR B = VAR A, ... (4 hops); which variables equal 12345?
    mqar             multi-query associative recall: the whole context is "key: value" lines; 4 keys asked
Depth (eval.py's --depths, cycled over the prompts) is where the first needle / assignment / asked pair sits; the others are at random places.
The haystack is RULER's repeated "The grass is green. ..." or the text of a file (eval.py's --haystack).

    prompts = make_prompts("niah_single", tok, length=1024, n=20)         # [{prompt, answers, depth, n_tokens}]
    scores = recall_suite("name", model, tok, {("niah_single", 1024): prompts}, "cuda", batch_size=32)
"""

import random
import re
import time
from itertools import groupby

import numpy as np
import torch

from common import autocast
from model import generate

TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "vt", "mqar")
DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
ADJECTIVES = ("able acid angry brave bright calm clever cold curly damp dark eager early fair fancy fast fierce flat "
              "fresh gentle giant glad golden grand happy heavy hollow honest huge icy jolly kind large late lazy "
              "loud lucky magic mellow mighty misty modern narrow noble odd old pale plain polite proud quick quiet "
              "rapid rare rich rough royal rusty sharp shiny silent silver sleepy slow small smooth soft solid sour "
              "spicy steady stormy strange sunny sweet swift tall tame tidy tiny wild windy wise young").split()
NOUNS = ("apple badge basket beach bell bird blanket boat bottle bridge brush bucket button cabin camera candle "
         "castle cave chair cloud coat comet desk dragon drum eagle engine feather fence flute forest fox garden "
         "ghost glove hammer harbor helmet island jacket jungle kettle kite ladder lamp lemon lion mango meadow "
         "mirror monkey needle ocean otter owl palace panda pencil pepper piano pillow planet pocket pony rabbit "
         "river robot rocket saddle shadow shell spoon statue tiger tower train tulip valley violin wagon whale "
         "window wizard").split()
KEYS = [f"{a}-{n}" for a in ADJECTIVES for n in NOUNS]


# ------------------------------------------------------------------------------------------------------ prompts

_HAYSTACK = {}  # (id(tok), haystack) -> (tok, token ids): the haystack is encoded once per tokenizer
_PROMPTS = {}   # make_prompts results by arguments: select_layers.py asks for the same prompts once per layer


def _haystack_ids(tok, haystack, n):
    """At least n token ids of the haystack text (the file repeated, or the filler sentences repeated)."""
    key = (id(tok), haystack)
    if key not in _HAYSTACK or _HAYSTACK[key][0] is not tok or len(_HAYSTACK[key][1]) < n:
        text = open(haystack, encoding="utf-8").read().strip() if haystack else FILLER
        reps = n // max(len(tok.encode(text)), 1) + 2
        _HAYSTACK[key] = (tok, tok.encode((" " if haystack == "" else "\n").join([text] * reps)))
    return _HAYSTACK[key][1]


def _insert(text, needles):
    """Put each (position in [0, 1], sentence) into text at the sentence boundary nearest the position, in order."""
    bounds = [0] + [m.end() for m in re.finditer(r"[.!?]\s+|\n", text)] + [len(text)]
    nearest = lambda x: min(bounds, key=lambda b: abs(b - x))
    out, prev = [], 0
    for pos, _, needle in sorted((nearest(f * len(text)), i, s) for i, (f, s) in enumerate(needles)):
        space = "" if pos == 0 or text[pos - 1].isspace() else " "
        out += [text[prev:pos], space + needle + " "]
        prev = pos
    return "".join(out) + text[prev:]


def mean(xs):
    return sum(xs) / len(xs)


def _and(words):
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def _task(task, tok, rng, depth, length, haystack):
    """One prompt's content as build(m) -> (message, answer prefix, answers), m = haystack (or pairs) tokens."""
    number = lambda digits: str(rng.randrange(10 ** (digits - 1), 10 ** digits))
    hay = lambda m: tok.decode(_haystack_ids(tok, haystack, m)[:m])
    if task.startswith("niah_"):
        n_keys, n_values = {"niah_single": (1, 1), "niah_multikey": (4, 1), "niah_multivalue": (1, 4),
                            "niah_multiquery": (4, 1)}[task]
        keys = rng.sample(KEYS, n_keys)
        values = [[number(7) for _ in range(n_values)] for _ in keys]
        needles = [f"One of the special magic numbers for {k} is: {v}." for k, vs in zip(keys, values) for v in vs]
        fracs = [depth] + [rng.random() for _ in needles[1:]]
        asked = keys if task == "niah_multiquery" else keys[:1]
        answers = [vs[0] for vs in values] if task == "niah_multiquery" else values[0]
        many = len(answers) > 1
        instruction = ("Some special magic numbers are hidden within the following text. Make sure to memorize "
                       "them. I will quiz you about the numbers afterwards.")
        question = (f"What {'are all the special magic numbers' if many else 'is the special magic number'} for "
                    f"{_and(asked)} mentioned in the provided text?")
        prefix = (f"The special magic number{'s' if many else ''} for {_and(asked)} mentioned in the provided text "
                  f"{'are' if many else 'is'}:")
        return lambda m: (f"{instruction}\n{_insert(hay(m), list(zip(fracs, needles)))}\n{question}", prefix, answers)
    if task == "vt":
        names = ["".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5)) for _ in range(5)]
        value = number(5)
        needles = [f"VAR {names[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:])]
        fracs = [depth] + sorted(depth + (1 - depth) * rng.random() for _ in names[1:])
        instruction = "Memorize and track the chain of variable assignments hidden in the following text."
        question = f"Question: Find all variables that are assigned the value {value} in the text above."
        prefix = (f"Answer: According to the chain of variable assignments in the text above, {len(names)} "
                  f"variables are assigned the value {value}, they are:")
        return lambda m: (f"{instruction}\n{_insert(hay(m), list(zip(fracs, needles)))}\n{question}", prefix, names)
    if task == "mqar":
        # The whole context is key: value lines; m tokens hold as many whole lines as fit.
        lines = [f"{k}: {number(4)}" for k in rng.sample(KEYS, min(len(KEYS), length // 4))]
        cum = np.cumsum([len(tok.encode(line + "\n")) for line in lines])
        extra = [rng.random() for _ in range(16)]
        instruction = "Memorize the following key-value pairs. I will ask you for the values of some keys afterwards."

        def build(m):
            P = max(int(np.searchsorted(cum, m, side="right")), 1)
            picks = [round(depth * (P - 1))]
            for u in extra:
                if len(picks) < min(4, P) and int(u * P) not in picks:
                    picks.append(int(u * P))
            asked = [lines[i].split(": ") for i in picks]
            what = _and([k for k, _ in asked])
            message = f"{instruction}\n" + "\n".join(lines[:P]) + f"\nWhat are the values of the keys {what}?"
            return message, f"The values of the keys {what} are:", [v for _, v in asked]
        return build
    raise ValueError(f"unknown recall task {task!r}; tasks: {', '.join(TASKS)}")


def make_prompts(task, tok, length, n, seed=0, depths=DEPTHS, haystack=""):
    """n prompts of `task`, each `length` tokens long (or a few less): [{prompt, answers, depth, n_tokens}].

    The prompt is the chat-formatted message (tok.chat, when the tokenizer has a chat format) plus an answer prefix,
    so the next tokens the model writes are the answer. The haystack is trimmed by tokens: m haystack tokens are
    adjusted by the gap to the target (m += length - tokens) until the prompt hits it; seeded by (task, length, seed)."""
    args = (id(tok), task, length, n, seed, tuple(depths), haystack)
    if args in _PROMPTS and _PROMPTS[args][0] is tok:
        return _PROMPTS[args][1]
    rng = random.Random(f"{task}/{length}/{seed}")
    wrap = (lambda msg: tok.chat(msg)) if tok.is_chat else (lambda msg: msg + "\n")
    prompts, m = [], length
    for i in range(n):
        depth = float(depths[i % len(depths)])
        build = _task(task, tok, rng, depth, length, haystack)
        best, tried = None, {}  # best: (tokens, message, prefix, answers) of the longest prompt that fits

        def attempt(m):
            nonlocal best
            message, prefix, answers = build(m)
            tried[m] = t = len(tok.encode(wrap(message) + prefix))
            if t <= length and (best is None or t > best[0]):
                best = (t, message, prefix, answers)
            return t

        while m not in tried and len(tried) < 12:
            t = attempt(m)
            if t == length:
                break
            m = max(m + length - t, 0)
        if best is None:
            # Every step overshot: the prompt grows in steps of many tokens (mqar's whole lines), so the -1 steps above
            # stay on one step. Bisect for the largest m that fits instead.
            lo, hi = -1, min(k for k, v in tried.items() if v > length)
            while hi - lo > 1:
                mid = (lo + hi) // 2
                lo, hi = (mid, hi) if attempt(mid) <= length else (lo, mid)
            m = max(lo, 0)
        if best is None:
            raise ValueError(f"{task}: {length} tokens is too short for its instructions and needles "
                             f"({tried[min(tried)]} tokens with a haystack of {min(tried)}); use a longer length")
        t, message, prefix, answers = best
        prompt = wrap(message) + prefix
        # A few tokens short (a needle moved a sentence boundary): k " ." filler tokens before the question (the
        # message's last line) make the prompt exactly `length`, so prompts of one length share a generate call.
        # A tokenizer may merge the last one with the newline (Qwen2's " .\n"): then one more.
        head, question = message.rsplit("\n", 1)
        k = length - t
        for _ in range(3 if t < length else 0):
            padded = wrap(head + " ." * k + "\n" + question) + prefix
            got = len(tok.encode(padded))
            if got == length:
                prompt, t = padded, length
                break
            k += length - got
            if k <= 0:
                break
        prompts.append(dict(prompt=prompt, answers=answers, depth=depth, n_tokens=t))
    _PROMPTS[args] = (tok, prompts)
    return prompts


# ------------------------------------------------------------------------------------------------------ scoring

def string_match_all(output, answers):
    """RULER's score of one output: the fraction of answers that occur in it, case-insensitive substrings."""
    return sum(a.lower() in output.lower() for a in answers) / len(answers)


def whole_word(output, answers):
    """The fraction of answers found in output as whole words (case and whitespace normalised): stricter than
    RULER, a longer number or word that contains the answer does not count."""
    text = " ".join(output.lower().split())
    found = [re.search(rf"(?<![0-9a-z]){re.escape(' '.join(a.lower().split()))}(?![0-9a-z])", text) for a in answers]
    return sum(f is not None for f in found) / len(answers)


def score_task(generate_fn, prompts):
    """generate_fn(list of prompt dicts) -> list of output strings; returns {acc, whole_word, scores, outputs,
    by_depth}: acc and by_depth are RULER's string_match_all, whole_word the whole-word mean."""
    outputs = generate_fn(prompts)
    scores = [string_match_all(o, p["answers"]) for o, p in zip(outputs, prompts)]
    by_depth = {str(d): mean([s for p, s in zip(prompts, scores) if p["depth"] == d])
                for d in sorted({p["depth"] for p in prompts})}
    return dict(acc=mean(scores), whole_word=mean([whole_word(o, p["answers"]) for o, p in zip(outputs, prompts)]),
                scores=scores, outputs=outputs, by_depth=by_depth)


def make_generate_fn(model, tok, device, batch_size=8, progress=None):
    """The greedy answers of `model`: prompts of equal token length share a generate call (no padding needed).
    progress(n) is called after each generate call with the number of prompts it answered."""
    # a chat model ends its turn with its end-of-turn token (Llama-3's <|eot_id|>), which need not be eos_id
    stops = getattr(tok, "stop_ids", None) or [tok.eos_id]

    @torch.no_grad()
    def generate_fn(prompts):
        ids = [tok.encode(p["prompt"]) for p in prompts]
        if getattr(tok, "add_bos", False) and tok.bos_id is not None:  # a base model trained with BOS first
            ids = [i if i[:1] == [tok.bos_id] else [tok.bos_id] + i for i in ids]
        outputs = [""] * len(prompts)
        for T, group in groupby(sorted(range(len(ids)), key=lambda i: len(ids[i])), key=lambda i: len(ids[i])):
            group = list(group)
            for s in range(0, len(group), batch_size):
                rows = group[s:s + batch_size]
                # each prompt's own budget, room for its answers twice over (models number their lists or repeat
                # the keys: "1. 8751473"); the batch runs to the largest, each row is cut at its own, so a score
                # never depends on which prompts shared the batch
                budget = {i: 2 * len(tok.encode(" " + ", ".join(prompts[i]["answers"]))) + 16 for i in rows}
                with autocast(device):
                    y = generate(model, torch.tensor([ids[i] for i in rows], device=device), max(budget.values()),
                                 eos_id=stops[-1])
                for i, row in zip(rows, y[:, T:].tolist()):
                    row = row[:budget[i]]
                    end = min([row.index(t) for t in stops if t in row], default=len(row))
                    outputs[i] = tok.decode(row[:end])
                if progress is not None:
                    progress(len(rows))
        return outputs
    return generate_fn


def recall_accuracy(model, tok, task="mqar", length=512, n=20, seed=0, device="cpu"):
    """Mean score of `model` on n prompts of one recall task (select_layers.py's ablation uses it)."""
    prompts = make_prompts(task, tok, length, n, seed)
    return score_task(make_generate_fn(model, tok, device), prompts)["acc"]


class Progress:
    """Work done of N with elapsed time and eta, printed at most every `every` seconds (and at the end): a recall run
    on a busy CPU takes many minutes, and a person waiting must see that it moves. Call it with each batch's count."""

    def __init__(self, label, total, unit="", every=10.0):
        self.label, self.total, self.unit, self.every = label, total, unit, every
        self.done, self.t0, self.last = 0, time.time(), time.time()

    def __call__(self, n):
        self.done += n
        now = time.time()
        if self.total and (now - self.last >= self.every or self.done == self.total):
            self.last, elapsed = now, now - self.t0
            eta = elapsed / self.done * (self.total - self.done)
            print(f"{self.label} {self.done}/{self.total}{' ' + self.unit if self.unit else ''} | {elapsed:.0f}s | "
                  f"eta {eta:.0f}s", flush=True)


def recall_suite(name, model, tok, prompts, device, batch_size):
    """Scores of one model on every (task, length) cell of prompts, with the means the table and plots show. The
    prompts of one length go through generate together, whatever their task: decoding steps cost the same for a
    batch of 8 or 64 rows, so fewer, fuller calls are the fast way. Prints progress (prompts done, eta) as it goes."""
    gen = make_generate_fn(model, tok, device, batch_size, Progress(f"{name} | recall", sum(len(p) for p in prompts.values()), "prompts"))
    cells, words, by_depth, examples = {}, {}, {}, {}
    for L in sorted({L for _, L in prompts}):
        t0 = time.time()
        keys = [key for key in prompts if key[1] == L]
        outputs = iter(gen([p for key in keys for p in prompts[key]]))
        for task, _ in keys:
            ps = prompts[(task, L)]
            s = score_task(lambda ps: [next(outputs) for _ in ps], ps)
            cells.setdefault(task, {})[str(L)] = s["acc"]
            words.setdefault(task, {})[str(L)] = s["whole_word"]
            by_depth.setdefault(task, {})[str(L)] = s["by_depth"]
            examples.setdefault(task, {})[str(L)] = dict(answers=ps[0]["answers"], output=s["outputs"][0])
        print(f"{name} | recall @ {L} | " + " | ".join(f"{t} {cells[t][str(L)]:.3f}" for t, _ in keys)
              + f" | {time.time() - t0:.1f}s", flush=True)
    lengths = list(next(iter(cells.values())))
    means = lambda c: dict(avg=mean([a for x in c.values() for a in x.values()]),
                           by_task={t: mean(list(x.values())) for t, x in c.items()},
                           by_length={L: mean([x[L] for x in c.values()]) for L in lengths})
    return dict(**means(cells), by_task_length=cells, by_depth=by_depth, examples=examples,
                whole_word=dict(**means(words), by_task_length=words))
