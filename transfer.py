"""
Stage 0 - attention weight transfer: turn the teacher into an all-linear student without any training.

Every layer's softmax attention is replaced by a linear mixer, gated linear attention (GLA, --mixer=gla) or Gated
DeltaNet (GDN, --mixer=gdn, the paper's main student), that starts from the teacher's own projections (RADLADS step
0): the query and output projections are copied (the output bias too, where a Llama config has one), and the key and
value projections are the teacher's repeated over the grouped-query heads, so that the mixer has one K/V head per
query head. With a softmax teacher the query/key products already measure relevance; the mixer keeps them and only
has to learn its decay (and, for GDN, write strength), output norm and swish gate, all new with their standard init
(method.md), which makes the alignment of Stage 1 short. Embeddings, norms, MLPs and the head are the teacher's,
unchanged. Qwen2's q/k/v biases are dropped (the paper does), and so are RoPE (the mixers have none) and Qwen3's
per-head q/k norms.

    grouped-query attention, n_rep = n_heads / n_kv_heads:
    W_k (mixer) [H*K, D] = rows of kv head j repeated for query heads j*n_rep .. (j+1)*n_rep-1   (HF's repeat_kv order)

Reads the teacher (HF folder, hub id, .gguf, or "" for the default SmolLM2-135M-Instruct); writes
out/<run>/transfer/ckpt.pt (+ meta.json) with the teacher source and the mixer in its config, for every later stage
to inherit.

    python transfer.py                                                      # default teacher (CPU, seconds)
    python transfer.py --mixer=gdn --run_name=smollm2_gdn                   # Gated DeltaNet student
    python transfer.py --teacher=Qwen/Qwen2.5-0.5B-Instruct --run_name=qwen # any HF folder, hub id or .gguf
"""

import dataclasses
import os
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from common import banner, fingerprint, parse_args, print_config

PROBE = "The capital of France is Paris. The capital of Germany is Berlin. The capital of Italy is"


@dataclass
class Config:
    run_name: str = "smollm2"       # run name: writes <out_dir>/<run_name>/transfer/ckpt.pt
    out_dir: str = "out"            # root of all runs
    teacher: str = ""               # HF folder | hub id | .gguf | "" -> default teacher (SmolLM2-135M-Instruct)
    output: str = ""                # checkpoint path; "" -> <out_dir>/<run_name>/transfer/ckpt.pt
    mixer: str = "gla"              # gla | gdn: the linear mixer every layer becomes
    seed: int = 0                   # init of the new mixer parameters (gates, output norm)


def expand_kv(weight, n_kv_heads, n_rep):
    """[n_kv*K, D] -> [n_kv*n_rep*K, D]: each kv head's rows repeated n_rep times in place (HF repeat_kv order)."""
    rows, d = weight.shape
    return weight.view(n_kv_heads, rows // n_kv_heads, d).repeat_interleave(n_rep, dim=0).reshape(-1, d)


@torch.no_grad()
def attention_to_mixer(attn, config, kind="gla"):
    """A GLA or GDN mixer initialised from one softmax attention module (RADLADS attention weight transfer): q and o
    (with o's bias) copied, k and v expanded over the query heads; everything else keeps its init."""
    from model import GDN, GLA
    mixer = {"gla": GLA, "gdn": GDN}[kind](config)
    n_rep = config.num_attention_heads // config.num_key_value_heads
    mixer.q_proj.weight.copy_(attn.q_proj.weight)
    mixer.k_proj.weight.copy_(expand_kv(attn.k_proj.weight, config.num_key_value_heads, n_rep))
    mixer.v_proj.weight.copy_(expand_kv(attn.v_proj.weight, config.num_key_value_heads, n_rep))
    mixer.o_proj.weight.copy_(attn.o_proj.weight)
    if attn.o_proj.bias is not None:  # the mixer's o_proj has a bias exactly when the attention's has (model.py)
        mixer.o_proj.bias.copy_(attn.o_proj.bias)
    return mixer.to(dtype=attn.q_proj.weight.dtype, device=attn.q_proj.weight.device)


@torch.no_grad()
def probe_kl(logits_t, logits_s):
    """Mean next-token KL(teacher || student) on the probe sentence: how far the untrained transfer is."""
    t = F.log_softmax(logits_t.float(), -1)
    return float((t.exp() * (t - F.log_softmax(logits_s.float(), -1))).sum(-1).mean())


def main(cfg):
    from model import save_checkpoint
    from teachers import DEFAULT_TEACHER, from_pretrained
    from tokenizer import load_tokenizer
    t0 = time.time()
    cfg.teacher = cfg.teacher or DEFAULT_TEACHER
    cfg.output = cfg.output or os.path.join(cfg.out_dir, cfg.run_name, "transfer", "ckpt.pt")
    if cfg.mixer not in ("gla", "gdn"):
        raise ValueError(f"--mixer={cfg.mixer!r}: expected gla or gdn")
    print_config(cfg)
    torch.manual_seed(cfg.seed)

    # ---- load the teacher (the student is the same model, converted in place)
    model = from_pretrained(cfg.teacher).eval()
    teacher = {"source": cfg.teacher, "fingerprint": fingerprint(model)}  # every later checkpoint carries it
    tok = load_tokenizer(cfg.teacher)
    c = model.config
    if c.num_attention_heads % c.num_key_value_heads:
        raise ValueError(f"{c.num_attention_heads} query heads are not a multiple of {c.num_key_value_heads} kv heads")
    banner("transfer (Stage 0)", "cpu", model)
    print(f"   teacher: {c.arch}, {c.num_hidden_layers} layers, {c.num_attention_heads} heads / "
          f"{c.num_key_value_heads} kv heads, head_dim {c.head_dim}")
    if c.attention_bias:
        print("   dropping the q/k/v biases of the attention (the paper's choice for linear layers)")
    if c.qk_norm:
        print(f"   dropping the per-head q/k norms (qwen3): {cfg.mixer.upper()} has none")
    idx = torch.tensor([tok.encode(PROBE)])
    with torch.no_grad():
        logits_teacher = model(idx)

    # ---- convert: every layer's attention becomes a GLA or GDN that starts from the teacher's projections
    for i, layer in enumerate(model.model.layers):
        model.set_mixer(i, attention_to_mixer(layer.self_attn, c, cfg.mixer), cfg.mixer)
    assert all(m == cfg.mixer for m in model.config.mixers)

    # ---- check and save
    with torch.no_grad():
        logits_student = model(idx)
    if not torch.isfinite(logits_student).all():
        raise FloatingPointError("the transferred student gives non-finite logits on the probe sentence")
    metrics = {"probe_kl": probe_kl(logits_teacher, logits_student), "n_layers": c.num_hidden_layers,
               "mixer_params": sum(p.numel() for n, p in model.named_parameters() if ".self_attn." in n)}
    save_checkpoint(cfg.output, model, stage="transfer", config=dataclasses.asdict(cfg), parent=cfg.teacher,
                    metrics=metrics, tokenizer=tok.source, teacher=teacher)
    print(f"final | probe_kl {metrics['probe_kl']:.4g} (teacher vs untrained student) | "
          f"{metrics['mixer_params'] / 1e6:.2f}M mixer params | {(time.time() - t0) / 60:.1f}m | {cfg.output}")
    return metrics


if __name__ == "__main__":
    main(parse_args(Config))
