"""
EleutherAI's lm-evaluation-harness on this project's models: the model `nanohybrid`, an lm_eval LM over any checkpoint
(teacher, hybrid, all-linear) or teacher source (an HF folder, a .gguf, "smollm2"), and the harness's RULER tasks
offline. lm-eval (pip install lm-eval==0.4.13, plus wonderwords and nltk for RULER) is imported only here.

How the harness finds it: lm_eval 0.4.13 looks models up in its own table (lm_eval.models.MODEL_MAPPING) and scans no
plugin entry point (--include_path adds tasks, not models), so `lm_eval --model nanohybrid` cannot see this class.
Run this file instead of `lm_eval`, with lm_eval's own arguments: it registers `nanohybrid`, fills in what RULER needs,
and hands the arguments to the harness's CLI. In Python, `import lm_eval_nanohybrid` registers it for simple_evaluate.

What the harness asks of a model, and how it is answered:
    loglikelihood(context, continuation)  log p(continuation | context) summed over the continuation's tokens, and
        whether greedy decoding would have produced them; context + continuation is tokenized whole and the context's
        tokens split off (TemplateLM's rule), windows longer than max_length lose tokens on the left. Rows of a batch
        are padded on the right, which a causal model never sees; logits only at the continuation's positions.
    loglikelihood_rolling(text)  the whole text in disjoint windows of max_length (lm_eval.utils), the first one
        conditioned on prefix_token_id (BOS, else EOS: the hf backend's rule; perplexity tasks: wikitext).
    generate_until(context, {until, max_gen_toks})  greedy, batched: prompts sorted by length; a batch prefills the
        length of its shortest prompt together, then steps one token at a time through model.decoder (a CUDA graph
        per step on the GPU), feeding each row its own prompt tokens until they run out and its greedy choice after:
        every row keeps its own positions with no padding and no mask, so the output equals generating it alone.
        A row stops at the tokenizer's stop ids (EOS, end of turn) or max_gen_toks; the text is cut at `until`.

RULER offline. The RULER tasks whose data the harness generates (niah_single_1, niah_multikey_2, niah_multikey_3,
ruler_vt, ruler_cwe, ruler_fwe; the others download Paul Graham essays or QA sets) need (1) a Hugging Face tokenizer
folder, named by the model argument `tokenizer`, to size prompts: this file writes one from the model's own tokenizer
(export.write_hf_tokenizer: an HF folder's files, or a GGUF's metadata as tokenizer.json) into
~/.cache/nanohybrid/hf_tokenizer/; (2) nltk's punkt_tab, which RULER's NIAH code looks for at import and otherwise
tries to download (a hang or an error without network). Only the essay haystacks ever split sentences with it; where
nltk has no punkt_tab, an untrained Punkt model (no learned abbreviations, which those essay tasks would notice) is
written to ~/.cache/nanohybrid/nltk_data and put on nltk's path, and a note says so. RULER makes 500 samples per
length, one length after another, and --limit takes the first ones: for several lengths with a limit, run one length
per call (eval.py --lm_eval does). Instruct models: add --apply_chat_template (the tokenizer folder's template).

    python lm_eval_nanohybrid.py --model nanohybrid --model_args ckpt=out/tiny/distill/ckpt.pt --tasks ruler_vt \\
        --metadata='{"max_seq_lengths":[512]}' --limit 4 --device cpu
    python lm_eval_nanohybrid.py --model nanohybrid --model_args ckpt=out/smollm2/distill/ckpt.pt --batch_size 32 \\
        --tasks niah_single_1,niah_multikey_2,niah_multikey_3,ruler_vt,ruler_cwe,ruler_fwe \\
        --metadata='{"max_seq_lengths":[1024,2048,4096]}' --output_path out/smollm2/lm_eval
"""

import hashlib
import json
import os
import sys

import torch
import torch.nn.functional as F
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from common import autocast, pick_device
from model import decoder
from recall import Progress

RULER_OFFLINE = ("niah_single_1", "niah_multikey_2", "niah_multikey_3", "ruler_vt", "ruler_cwe", "ruler_fwe")
CACHE = os.environ.get("NANOHYBRID_CACHE") or os.path.expanduser("~/.cache/nanohybrid")


# ------------------------------------------------------------------------------------------------- RULER offline

def hf_tokenizer_dir(source):
    """A Hugging Face tokenizer folder for a tokenizer source (checkpoint, HF folder, .gguf, "smollm2"), written once
    into the cache: RULER's tasks size their prompts with AutoTokenizer.from_pretrained(<this folder>)."""
    from export import write_hf_tokenizer
    from tokenizer import _from_checkpoint
    while source.endswith(".pt"):
        source = _from_checkpoint(source)
    key = os.path.abspath(source) if os.path.exists(source) else source or "smollm2"
    folder = os.path.join(CACHE, "hf_tokenizer", hashlib.sha256(key.encode()).hexdigest()[:16])
    if not os.path.exists(os.path.join(folder, "tokenizer.json")):
        write_hf_tokenizer(source, folder + ".tmp")
        os.replace(folder + ".tmp", folder)
        print(f"wrote the HF tokenizer of {key} to {folder}")
    return folder


def punkt_offline():
    """Make nltk find a punkt_tab without downloading: the installed one if there is one, else an untrained Punkt
    model written to the cache (RULER's import only checks for it; only essay haystacks would use it)."""
    import nltk
    from nltk.tokenize.punkt import PunktParameters, save_punkt_params
    try:
        nltk.data.find("tokenizers/punkt_tab/english/")
        return None
    except LookupError:
        pass
    root = os.path.join(CACHE, "nltk_data")
    english = os.path.join(root, "tokenizers", "punkt_tab", "english")
    nltk.data.path.insert(0, root)  # first: nltk writes only under its data path
    if not os.path.exists(os.path.join(english, "sentence_starters.txt")):
        os.makedirs(english, exist_ok=True)
        save_punkt_params(PunktParameters(), dir=english)
    note = (f"nltk has no punkt_tab: an untrained Punkt model ({root}) stands in; the offline RULER tasks never split "
            f"sentences, the essay ones would (for those: python -m nltk.downloader punkt_tab)")
    print(f"note: {note}")
    return note


# ----------------------------------------------------------------------------------------------------- the model

@register_model("nanohybrid")
class NanoHybridLM(TemplateLM):
    """lm_eval's LM over a nanohybrid model. Model arguments: ckpt (a checkpoint .pt or teacher source), tokenizer
    (an HF tokenizer folder, read by RULER's tasks only; this class tokenizes with tokenizer.py), batch_size,
    device, max_length (default the model's max_position_embeddings), prefix_token_id. In Python, model= and tok=
    take a loaded Transformer and its Tokenizer instead of ckpt."""

    def __init__(self, ckpt="", tokenizer=None, batch_size=8, max_batch_size=None, device=None, max_length=None,
                 prefix_token_id=None, model=None, tok=None):
        super().__init__()
        from teachers import from_pretrained
        from tokenizer import check_vocab, load_tokenizer
        if str(batch_size).startswith("auto"):
            raise ValueError("--batch_size auto is not supported by nanohybrid: give a number (e.g. 16)")
        device = str(device or pick_device())
        if device.startswith("cuda") and not torch.cuda.is_available():
            print(f"note: --device {device} asked for, but CUDA is not available: running on the CPU")
            device = "cpu"
        self._device = torch.device(device)
        if model is None:
            if not ckpt:
                raise ValueError("nanohybrid needs --model_args ckpt=<checkpoint .pt or teacher source, e.g. smollm2>")
            model, tok = from_pretrained(ckpt, device=device).eval(), load_tokenizer(ckpt)
        self.model, self.tok, self.ckpt, self.hf_tokenizer = model, tok, ckpt, tokenizer
        check_vocab(tok, model.config.vocab_size)
        self.batch_size = int(batch_size)
        self._max_length = int(max_length or model.config.max_position_embeddings)
        self._prefix = int(prefix_token_id) if prefix_token_id is not None else None

    @property
    def eot_token_id(self):
        return self.tok.eos_id

    @property
    def prefix_token_id(self):
        if self._prefix is not None:
            return self._prefix
        return self.tok.bos_id if self.tok.bos_id is not None else self.tok.eos_id

    @property
    def max_length(self):
        return self._max_length

    @property
    def tokenizer_name(self):
        return str(self.tok.source).replace("/", "__")

    def tok_encode(self, string, add_special_tokens=None, **kwargs):
        ids = self.tok.encode(string)
        # a tokenizer that prepends BOS (Llama-3 base) does so here too, as the hf backend's tokenizer would
        if add_special_tokens is not False and self.tok.add_bos and self.tok.bos_id is not None \
                and ids[:1] != [self.tok.bos_id]:
            ids = [self.tok.bos_id] + ids
        return ids

    def _hf_tok(self):
        from transformers import AutoTokenizer
        if self.hf_tokenizer is None:
            self.hf_tokenizer = hf_tokenizer_dir(self.ckpt or self.tok.source)
        return AutoTokenizer.from_pretrained(self.hf_tokenizer)

    def chat_template(self, chat_template=False):
        return self._hf_tok().chat_template if chat_template else None

    def apply_chat_template(self, chat_history, add_generation_prompt=True):
        return self._hf_tok().apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    # ---- scoring

    @torch.no_grad()
    def _loglikelihood_tokens(self, requests, disable_tqdm=False, **kwargs):
        """requests: [((context, continuation) or (None, None), context ids, continuation ids)] -> [(logprob, greedy)].
        The model reads (context + continuation)[-(max_length + 1):][:-1]; the last len(continuation) positions
        predict the continuation."""
        out = [None] * len(requests)
        rows = []
        for i, (_, ctx, cont) in enumerate(requests):
            inp = (ctx + cont)[-(self.max_length + 1):][:-1]
            rows.append((i, inp, cont[-len(inp):] if len(cont) > len(inp) else cont))
        rows.sort(key=lambda r: -len(r[1]))  # longest first: batches of similar length, an OOM shows at once
        head = self.model.lm_head.weight
        progress = Progress("nanohybrid | loglikelihood", len(rows)) if not disable_tqdm else (lambda n: None)
        for s in range(0, len(rows), self.batch_size):
            batch = rows[s:s + self.batch_size]
            T = len(batch[0][1])
            idx = torch.zeros(len(batch), T, dtype=torch.long)
            for b, (_, inp, _) in enumerate(batch):
                idx[b, :len(inp)] = torch.tensor(inp)  # right padding: a causal model's earlier positions never see it
            with autocast(self._device):
                hidden = self.model(idx.to(self._device), return_hidden=True)
            for b, (i, inp, cont) in enumerate(batch):
                n = len(cont)
                logp = F.log_softmax((hidden[b, len(inp) - n:len(inp)] @ head.t()).float(), dim=-1)  # [n, vocab]
                target = torch.tensor(cont, device=logp.device)
                out[i] = (logp.gather(1, target[:, None]).sum().item(), bool((logp.argmax(-1) == target).all()))
                (context, continuation), _, _ = requests[i]
                if context is not None:
                    self.cache_hook.add_partial("loglikelihood", (context, continuation), out[i])
            progress(len(batch))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm=False):
        windows, owner = [], []
        for r, (text,) in enumerate(req.args for req in requests):
            for ctx, cont in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
                    context_len=1)):
                windows.append(((None, None), ctx, cont))
                owner.append(r)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for r, (logp, _) in zip(owner, scores):
            totals[r] += logp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ---- generation

    @torch.no_grad()
    def greedy(self, prompts, max_new):
        """Greedy continuations (token lists, up to max_new each, cut after a stop id) of prompts of any lengths in
        one batch: prefill the shortest length together, then one decoding step per position, where a row still
        inside its prompt is fed its prompt token and a row past it its own greedy choice."""
        model, dev = self.model, self._device
        lens = [len(p) for p in prompts]
        T0, T1 = min(lens), max(lens)
        stops = set(getattr(self.tok, "stop_ids", None) or [self.tok.eos_id])
        prompt = torch.zeros(len(prompts), T1, dtype=torch.long)
        for b, p in enumerate(prompts):
            prompt[b, :len(p)] = torch.tensor(p)
        prompt, length = prompt.to(dev), torch.tensor(lens, device=dev)
        cache = model.new_cache(len(prompts), T1 + max_new)
        out, done = [[] for _ in prompts], [False] * len(prompts)
        with autocast(dev):
            logits = model.lm_head(model(prompt[:, :T0], cache=cache, return_hidden=True)[:, -1]).float()
            step = decoder(model, cache)
            for t in range(T0, T1 + max_new):  # t: the position whose token is chosen now
                inside = t < length
                nxt = torch.where(inside, prompt[:, min(t, T1 - 1)], logits.argmax(-1))
                for b, (token, fed) in enumerate(zip(nxt.tolist(), inside.tolist())):
                    if not fed and not done[b]:
                        if token in stops:
                            done[b] = True
                        else:
                            out[b].append(token)
                            done[b] = len(out[b]) == max_new
                if all(done) or t == T1 + max_new - 1:
                    break
                logits = step(nxt[:, None])
        return out

    def generate_until(self, requests, disable_tqdm=False):
        """Greedy generation, batched by generation settings and prompt length (see the module docstring)."""
        results = [None] * len(requests)
        groups = {}
        for i, req in enumerate(requests):
            context, gen_kwargs = req.args
            groups.setdefault(json.dumps(gen_kwargs, sort_keys=True, default=str), []).append(i)
        progress = Progress("nanohybrid | generate_until", len(requests)) if not disable_tqdm else (lambda n: None)
        for members in groups.values():
            kwargs = dict(requests[members[0]].args[1])
            if kwargs.get("do_sample") or float(kwargs.get("temperature") or 0) > 0:
                raise ValueError(f"nanohybrid generates greedily; this task asks for sampling ({kwargs})")
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.get("max_gen_toks") or kwargs.get("max_new_tokens") or 256)
            if max_new >= self.max_length:
                raise ValueError(f"max_gen_toks={max_new} leaves no room for a prompt in max_length={self.max_length}")
            # as the hf backend does: the context keeps its last max_length - max_gen_toks tokens
            enc = {i: self.tok_encode(requests[i].args[0])[-(self.max_length - max_new):] for i in members}
            order = sorted(members, key=lambda i: len(enc[i]))
            for s in range(0, len(order), self.batch_size):
                batch = order[s:s + self.batch_size]
                for i, tokens in zip(batch, self.greedy([enc[i] for i in batch], max_new)):
                    text = self.tok.decode(tokens)
                    for stop in until:
                        text = text.split(stop)[0]
                    results[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                progress(len(batch))
        return results


# ------------------------------------------------------------------------------------------- eval.py --lm_eval

def ruler_folder():
    import lm_eval
    return os.path.join(os.path.dirname(lm_eval.__file__), "tasks", "ruler")


def split_tasks(text):
    """Comma-separated harness task names -> (RULER's, the others); unknown names refused. RULER's folder is indexed
    in a moment, all of the harness's tasks in half a minute (on a busy 2-core CPU), so that only when needed."""
    from lm_eval.tasks import TaskManager
    tasks = [t for t in text.split(",") if t]
    ruler = [t for t in tasks if t in TaskManager(include_path=ruler_folder(), include_defaults=False).all_tasks]
    other = [t for t in tasks if t not in ruler]
    unknown = [t for t in other if t not in TaskManager().all_tasks] if other else []
    if unknown:
        raise ValueError(f"--lm_eval: unknown task(s) {unknown} (the harness lists its tasks with `lm_eval ls tasks`)")
    return ruler, other


def evaluate_tasks(name, model, tok, hf_tok, ruler, other, lengths, batch_size, limit, device):
    """{task: {metric: value}} of one loaded model; RULER's tasks as {length: string_match_all}, one harness run per
    length (its data made at that length, `limit` samples of it), the others once."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    lm = NanoHybridLM(model=model, tok=tok, tokenizer=hf_tok, batch_size=batch_size, device=device,
                      max_length=max([model.config.max_position_embeddings] + lengths))
    out = {}
    for L in lengths if ruler else []:
        print(f"{name} | lm_eval {','.join(ruler)} @ {L}", flush=True)
        manager = TaskManager(include_path=ruler_folder(), include_defaults=False,
                              metadata={"tokenizer": hf_tok, "max_seq_lengths": [L]})
        results = simple_evaluate(model=lm, tasks=ruler, limit=limit or None, task_manager=manager)["results"]
        for t in ruler:
            out.setdefault(t, {})[str(L)] = results[t][f"{L},none"]
    if other:
        print(f"{name} | lm_eval {','.join(other)}", flush=True)
        results = simple_evaluate(model=lm, tasks=other, limit=limit or None,
                                  task_manager=TaskManager(metadata={"tokenizer": hf_tok}))["results"]
        for t in other:
            out[t] = {k.split(",")[0]: v for k, v in results[t].items()
                      if isinstance(v, (int, float)) and "stderr" not in k}
    return out


# ---------------------------------------------------------------------------------------------------------- CLI

def main(argv):
    """lm_eval's CLI with `nanohybrid` registered; for --model nanohybrid, model arg tokenizer= defaults to the
    model's own tokenizer written as an HF folder, and nltk's punkt_tab is made available offline."""
    from lm_eval._cli import HarnessCLI
    from lm_eval.utils import setup_logging
    setup_logging()
    sys.argv = ["lm_eval", *argv]
    cli = HarnessCLI()
    args = cli.parse_args()
    if getattr(args, "model", None) == "nanohybrid":
        model_args = args.model_args or {}
        if not model_args.get("ckpt"):
            raise SystemExit("error: --model nanohybrid needs --model_args ckpt=<checkpoint .pt or teacher source>")
        model_args.setdefault("tokenizer", hf_tokenizer_dir(str(model_args["ckpt"])))
        args.model_args = model_args
        punkt_offline()
    cli.execute(args)


if __name__ == "__main__":
    main(sys.argv[1:])
