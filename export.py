"""
Export a checkpoint to a Hugging Face folder (config.json, model.safetensors, tokenizer files) that other tools load
with `AutoModelForCausalLM.from_pretrained`: the all-softmax teacher as plain transformers (LlamaForCausalLM,
Qwen2ForCausalLM, Qwen3ForCausalLM), a hybrid as flash-linear-attention's GLAForCausalLM (GLA students) or
GatedDeltaNetForCausalLM (GDN students), whose config lists the softmax layers in its `attn` dict.

A target class fixes some choices that our model leaves open, so an export is a name map plus a check that every
choice agrees; what the target cannot express is refused with the reason, never approximated:

    ours (model.py)                          fla (GLAConfig / GatedDeltaNetConfig)
    model.embed_tokens                       model.embeddings
    layers.i.input_layernorm                 layers.i.attn_norm
    layers.i.post_attention_layernorm        layers.i.mlp_norm
    layers.i.self_attn.*                     layers.i.attn.*   (GLA's g_norm -> g_norm_swish_gate: fuse_norm=True)
    layers.i.mlp.{gate,up,down}_proj         layers.i.mlp.{gate,up,down}_proj  (hidden_act swish = SiLU)
    GLA: logsigmoid(gk)/16, gate rank 16     gate_logit_normalizer=16, gate_low_rank_dim=16 (fixed in GLABlock)
    GLA: no feature map, conv, clamp         feature_map=None, use_short_conv=False, clamp_min=None
    GLA: H heads of K, swish output gate     num_heads=H, expand_k=expand_v=H*K/D, use_output_gate, hidden_act swish
    GDN: H heads of K, expand_v 1, gate      head_dim=K, num_heads=H, expand_v=1, use_gate, use_short_conv=False
    one eps: block norms (teacher's) and     norm_eps, shared by the block norms and the mixer's output norm, so
        the mixer's output norm (1e-5)           a teacher whose rms_norm_eps is not 1e-5 (Qwen2.5: 1e-6) is refused
    softmax layers: GQA, RoPE theta,         attn = {layers, num_heads, num_kv_heads, qkv_bias, rope_theta}; fla's
        q/k/v biases (qwen2)                     attention has no RoPE scaling, no qk norm (qwen3), no o_proj bias,
                                                 and head_dim = hidden_size / num_heads: anything else is refused

Reads  a checkpoint (model_config + state dict, read as saved: no model is built) or a teacher
       source (HF folder, .gguf, "smollm2"), and its tokenizer source.
Writes <out>/config.json, model.safetensors, generation_config.json, tokenizer.json, tokenizer_config.json.
Loading an fla export: `import fla` first (it registers the classes with transformers); its kernels need CUDA.

    python export.py --input=out/tiny/distill/ckpt.pt --out=out/tiny/hf         # tiny CPU: checks nothing on fla
    python export.py --run_name=smollm2 --verify=on                                  # GPU + fla: logits vs ours
"""

import json
import math
import os
import shutil
from dataclasses import asdict, dataclass

import torch

from common import parse_args, print_config
from tokenizer import _from_checkpoint, _from_gguf, bytes_to_unicode
from teachers import from_pretrained, resolve_source

HF_CLASSES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
FLA_CLASSES = {"gla": ("GLAForCausalLM", "gla"), "gdn": ("GatedDeltaNetForCausalLM", "gated_deltanet")}
GLA_NORM_EPS = 1e-5  # model.py's GLA output norm (method.md); GDN's is the same


def mixer_shapes(kind, D, H, K):
    """The tensors of one linear-attention layer under self_attn., named and shaped as fla's layer with the config
    hf_config writes (H heads of K = V, expand_v 1, gate rank 16) has them."""
    shared = {"q_proj.weight": (H * K, D), "k_proj.weight": (H * K, D), "v_proj.weight": (H * K, D),
              "g_proj.weight": (H * K, D), "o_proj.weight": (D, H * K)}
    if kind == "gla":
        return dict(shared, **{"gk_proj.0.weight": (16, D), "gk_proj.1.weight": (H * K, 16), "gk_proj.1.bias": (H * K,),
                               "g_norm.weight": (K,)})
    return dict(shared, **{"a_proj.weight": (H, D), "b_proj.weight": (H, D), "A_log": (H,), "dt_bias": (H,),
                           "o_norm.weight": (K,)})


@dataclass
class Config:
    run_name: str = "smollm2"       # run name: reads <out_dir>/<run_name>/finetune (else distill) if --input is unset
    out_dir: str = "out"            # root of all runs
    input: str = ""                 # checkpoint .pt or teacher source; "" = the run's final checkpoint
    out: str = ""                   # output folder; "" = <out_dir>/<run>/hf
    dtype: str = "float32"          # float32 | bfloat16 | float16: the dtype of the saved weights
    verify: str = "auto"            # auto | on | off: reload the export and compare its logits with ours (auto: when
                                    # it can run here: transformers targets always, fla targets with CUDA and fla)


# ------------------------------------------------------------------------------------------------------- mapping

def target(mc):
    """The class an export of model_config `mc` becomes, or ValueError with the reason it cannot be expressed."""
    kinds = set(mc["mixers"])
    if kinds == {"attn"}:
        return HF_CLASSES[mc["arch"]]
    linear = kinds - {"attn"}
    if len(linear) > 1 or not linear <= set(FLA_CLASSES):
        raise ValueError(f"mixers {sorted(kinds)}: fla has one class per linear mixer (GLA or GatedDeltaNet), so a "
                         f"model that mixes {sorted(linear)} cannot be exported")
    kind = linear.pop()
    D, H, K = mc["hidden_size"], mc["num_attention_heads"], mc["head_dim"]
    problems = []
    if not math.isclose(mc["rms_norm_eps"], GLA_NORM_EPS, rel_tol=1e-6):  # a GGUF stores 1e-5 as float32
        problems.append(f"rms_norm_eps is {mc['rms_norm_eps']} but the {kind} output norm's eps is {GLA_NORM_EPS}; "
                        f"fla has one norm_eps for both")
    if kind == "gla" and mc.get("gla_gate_rank", 16) != 16:
        problems.append(f"gla_gate_rank is {mc['gla_gate_rank']}; fla's GLABlock fixes gate_low_rank_dim=16")
    if "attn" in kinds:
        if mc.get("rope_scaling"):
            problems.append(f"rope_scaling {mc['rope_scaling'].get('rope_type')!r}: fla's attention has plain RoPE")
        if mc["qk_norm"]:
            problems.append("q/k norms (qwen3): fla's attention spec cannot turn on qk_norm")
        if mc["attention_bias"] and mc["arch"] != "qwen2":
            problems.append("an o_proj bias: fla's attention has q/k/v biases only")
        if H * K != D:
            problems.append(f"head_dim {K} x {H} heads != hidden_size {D}: fla's attention derives head_dim = "
                            f"hidden_size / num_heads")
    if problems:
        raise ValueError("cannot export to fla's " + FLA_CLASSES[kind][0] + ": " + "; ".join(problems))
    return FLA_CLASSES[kind][0]


def hf_config(mc, dtype):
    """config.json for model_config `mc` (its target class is target(mc))."""
    name = target(mc)
    common = dict(architectures=[name], vocab_size=mc["vocab_size"], hidden_size=mc["hidden_size"],
                  intermediate_size=mc["intermediate_size"], num_hidden_layers=mc["num_hidden_layers"],
                  max_position_embeddings=mc["max_position_embeddings"],
                  tie_word_embeddings=mc["tie_word_embeddings"], bos_token_id=mc["bos_token_id"],
                  eos_token_id=mc["eos_token_id"], torch_dtype=dtype)
    if name in HF_CLASSES.values():
        cfg = dict(common, model_type=mc["arch"], num_attention_heads=mc["num_attention_heads"],
                   num_key_value_heads=mc["num_key_value_heads"], head_dim=mc["head_dim"], hidden_act="silu",
                   rms_norm_eps=mc["rms_norm_eps"], rope_theta=mc["rope_theta"], attention_bias=mc["attention_bias"])
        if mc.get("rope_scaling"):
            if mc["rope_scaling"]["rope_type"] != "llama3":
                raise ValueError(f"rope scaling {mc['rope_scaling']['rope_type']!r} (per-frequency factors from a "
                                 f"GGUF) has no transformers config; export from the HF folder instead")
            cfg["rope_scaling"] = mc["rope_scaling"]
        if mc["arch"] == "llama":
            cfg["mlp_bias"] = False
        else:
            cfg["use_sliding_window"] = False
        return cfg
    attn_layers = [i for i, kind in enumerate(mc["mixers"]) if kind == "attn"]
    attn = dict(layers=attn_layers, num_heads=mc["num_attention_heads"], num_kv_heads=mc["num_key_value_heads"],
                qkv_bias=mc["attention_bias"], window_size=None, rope_theta=mc["rope_theta"]) if attn_layers else None
    D, H, K = mc["hidden_size"], mc["num_attention_heads"], mc["head_dim"]
    shared = dict(common, intermediate_size=mc["intermediate_size"], hidden_ratio=None, hidden_act="swish",
                  norm_eps=mc["rms_norm_eps"], attn=attn, attn_mode="chunk", use_short_conv=False, fuse_norm=True,
                  fuse_swiglu=True, fuse_cross_entropy=True)
    if name == "GLAForCausalLM":
        return dict(shared, model_type="gla", num_heads=H, num_kv_heads=None, expand_k=H * K / D, expand_v=H * K / D,
                    feature_map=None, use_output_gate=True, clamp_min=None, elementwise_affine=True, use_gk=True,
                    use_gv=False)
    return dict(shared, model_type="gated_deltanet", num_heads=H, num_v_heads=None, head_dim=K, expand_v=1.0,
                use_gate=True, allow_neg_eigval=False, output_gate_activation="swish")


def hf_state_dict(mc, sd):
    """Our tensor names -> the target's; refuses a linear-attention layer whose tensors are not fla's layer's."""
    out = {}
    fla = set(mc["mixers"]) != {"attn"}
    for layer, kind in enumerate(mc["mixers"]):
        if kind == "attn":
            continue
        prefix = f"model.layers.{layer}.self_attn."
        have = {k[len(prefix):]: tuple(v.shape) for k, v in sd.items() if k.startswith(prefix)}
        need = mixer_shapes(kind, mc["hidden_size"], mc["num_attention_heads"], mc["head_dim"])
        if have != need:
            raise ValueError(f"layer {layer} ({kind}): its tensors are not those of fla's layer: missing "
                             f"{sorted(need.keys() - have.keys())}, extra {sorted(have.keys() - need.keys())}, "
                             f"shaped otherwise {sorted(k for k in need.keys() & have.keys() if need[k] != have[k])}")
    for name, t in sd.items():
        if name == "lm_head.weight" and mc["tie_word_embeddings"]:
            continue  # stored once, as the embedding; both classes re-tie on loading
        if fla:
            parts = name.split(".")
            if name == "model.embed_tokens.weight":
                name = "model.embeddings.weight"
            elif parts[:2] == ["model", "layers"]:
                kind = mc["mixers"][int(parts[2])]
                rest = ".".join(parts[3:])
                rest = {"input_layernorm.weight": "attn_norm.weight",
                        "post_attention_layernorm.weight": "mlp_norm.weight"}.get(rest, rest)
                if rest.startswith("self_attn."):
                    rest = "attn." + rest[len("self_attn."):]
                    if kind == "gla" and rest == "attn.g_norm.weight":
                        rest = "attn.g_norm_swish_gate.weight"  # fuse_norm=True: norm and swish gate in one module
                name = ".".join(parts[:3] + [rest])
        out[name] = t
    return out


# ----------------------------------------------------------------------------------------------------- tokenizer

def write_hf_tokenizer(source, folder, max_length=None):
    """tokenizer.json + tokenizer_config.json in `folder` for a tokenizer source of tokenizer.py: an HF folder's files
    are copied, a GGUF's metadata is written out as a byte-level BPE tokenizer.json (its pre-tokenizer regex as a
    Split, then ByteLevel without regex: what tokenizer.py reads back to the same ids). Returns the folder."""
    os.makedirs(folder, exist_ok=True)
    while source.endswith(".pt"):
        source = _from_checkpoint(source)
    path = resolve_source(source)
    if not os.path.exists(path):
        from huggingface_hub import snapshot_download
        from tokenizer import TOKENIZER_FILES
        path = snapshot_download(source, allow_patterns=TOKENIZER_FILES)
    if os.path.isdir(path) and os.path.exists(os.path.join(path, "tokenizer.json")):
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
            if os.path.exists(os.path.join(path, name)):
                shutil.copy(os.path.join(path, name), os.path.join(folder, name))
        return folder
    if not path.endswith(".gguf"):
        raise ValueError(f"tokenizer source {source!r}: only an HF folder with tokenizer.json or a .gguf can be "
                         f"written as an HF tokenizer (for a Llama-3 tokenizer.model, use the model's HF folder)")
    g = _from_gguf(path, path)
    spell = bytes_to_unicode()
    text = lambda b: "".join(spell[x] for x in b)
    # added tokens sit in the BPE vocab too, as HF writes them (transformers re-adds a special token it cannot find)
    vocab = {text(b): i for b, i in g["vocab"].items()} | g["added"]
    added = [dict(id=i, content=t, single_word=False, lstrip=False, rstrip=False, normalized=False, special=True)
             for t, i in sorted(g["added"].items(), key=lambda kv: kv[1])]
    name_of = {i: t for t, i in vocab.items()}
    bos, eos = name_of.get(g["bos"]), name_of.get(g["eos"])
    post = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    if g["add_bos"] and bos is not None:
        post = {"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": bos, "type_id": 0}},
                                                         {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                         {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {bos: {"id": bos, "ids": [g["bos"]], "tokens": [bos]}}}
    tj = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
          "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
              {"type": "Split", "pattern": {"Regex": g["pattern"]}, "behavior": "Isolated", "invert": False},
              {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
          "post_processor": post,
          "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
          "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                    "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                    "vocab": vocab, "merges": [[text(a), text(b)] for a, b in g["merges"]]}}
    tc = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos,
          "add_bos_token": g["add_bos"], "clean_up_tokenization_spaces": False, "chat_template": g["chat_template"],
          "model_max_length": max_length or int(1e30)}
    for name, obj in (("tokenizer.json", tj), ("tokenizer_config.json", tc)):
        with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
            json.dump(obj, f, ensure_ascii=False)
    return folder


# -------------------------------------------------------------------------------------------------------- verify

def sdpa_flash_attn(q, k, v, causal=True, window_size=(-1, -1)):
    """flash_attn_func's math (q, k, v as (B, T, heads, head_dim), GQA, causal, no window, as many queries as keys)
    with PyTorch's SDPA."""
    if not causal or tuple(window_size) != (-1, -1) or q.shape[1] != k.shape[1]:
        raise ValueError(f"the SDPA stand-in for flash-attn does causal attention without a window over as many "
                         f"queries as keys only (got causal={causal}, window_size={window_size}, "
                         f"{q.shape[1]} queries, {k.shape[1]} keys)")
    o = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                         is_causal=True, enable_gqa=True)
    return o.transpose(1, 2)


@torch.no_grad()
def verify(folder, model, device):
    """Max |logit difference| between the export (loaded by transformers, fla imported for fla classes) and our
    model, both fp32 on `device`, on 2 x 48 random tokens. fla's softmax layers call flash-attn, which computes in
    bf16/fp16 only (and has no wheel on PyPI): for this fp32 comparison PyTorch's SDPA, the same causal GQA attention,
    takes its place while verify runs, and is taken out again after."""
    from transformers import AutoModelForCausalLM
    attn = None
    if json.load(open(os.path.join(folder, "config.json")))["architectures"][0] not in HF_CLASSES.values():
        import fla.layers.attn as attn
        import fla.models  # noqa: F401  (registers GLA / GatedDeltaNet with transformers' Auto classes)
        print("verify: fla's softmax layers run PyTorch's SDPA in place of flash-attn (fp32; flash-attn is bf16/fp16)")
    saved = attn.flash_attn_func if attn else None
    try:
        if attn:
            attn.flash_attn_func = sdpa_flash_attn   # read when fla builds its attention layers and when they run
        theirs = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(device).eval()
        idx = torch.randint(0, model.config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0)).to(device)
        return (theirs(idx).logits.float() - model.to(device).float()(idx).float()).abs().max().item()
    finally:
        if attn:
            attn.flash_attn_func = saved


def can_verify(name, device):
    """Why the export cannot be reloaded and run here ("" when it can)."""
    if name in HF_CLASSES.values():
        return ""
    if not device.startswith("cuda"):
        return "fla's kernels need CUDA"
    try:
        import fla.models  # noqa: F401  (flash-linear-attention; fla-core alone has the kernels, not the classes)
    except ImportError as e:
        return (f"fla's model classes do not import ({e}): pip install flash-linear-attention (the package of "
                f"fla.models; fla-core alone has only the kernels)")
    return ""


# ---------------------------------------------------------------------------------------------------------- main

def main(cfg):
    if cfg.dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"--dtype={cfg.dtype!r}: choose float32, bfloat16 or float16")
    if cfg.verify not in ("auto", "on", "off"):
        raise ValueError(f"--verify={cfg.verify!r}: choose auto, on or off")
    run_dir = os.path.join(cfg.out_dir, cfg.run_name)
    if not cfg.input:
        final = [p for p in (f"{run_dir}/finetune/ckpt.pt", f"{run_dir}/distill/ckpt.pt") if os.path.exists(p)]
        if not final:
            raise FileNotFoundError(f"no checkpoint in {run_dir}/finetune or {run_dir}/distill: pass --input "
                                    f"(a checkpoint .pt, or a teacher source such as smollm2)")
        cfg.input = final[0]
    cfg.out = cfg.out or os.path.join(run_dir, "hf")
    print_config(cfg)

    # ---- read: a checkpoint's tensors and model_config as saved (no model built, so any mixer model.py lacks
    # today still exports), or a teacher through teachers.py
    if cfg.input.endswith(".pt"):
        ckpt = torch.load(cfg.input, map_location="cpu", weights_only=True)
        if not isinstance(ckpt, dict) or ckpt.get("format") != 1:
            raise ValueError(f"{cfg.input}: not a nanohybrid checkpoint (format 1)")
        mc, sd, tok_source = ckpt["model_config"], ckpt["model"], ckpt.get("tokenizer") or cfg.input
    else:
        teacher = from_pretrained(cfg.input)
        mc, sd, tok_source = asdict(teacher.config), teacher.state_dict(), cfg.input
    mc = dict(mc, mixers=mc.get("mixers") or ["attn"] * mc["num_hidden_layers"])
    name = target(mc)
    print(f"export: {cfg.input} ({mc['mixers'].count('attn')}/{len(mc['mixers'])} softmax layers) -> {name}")

    # ---- write: config, weights, generation config, tokenizer
    from safetensors.torch import save_file
    dtype = getattr(torch, cfg.dtype)
    config = hf_config(mc, cfg.dtype)
    tensors = {k: v.to(dtype).contiguous() for k, v in hf_state_dict(mc, sd).items()}
    os.makedirs(cfg.out, exist_ok=True)
    with open(os.path.join(cfg.out, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    save_file(tensors, os.path.join(cfg.out, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(cfg.out, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": mc["bos_token_id"], "eos_token_id": mc["eos_token_id"]}, f, indent=2)
    write_hf_tokenizer(tok_source, cfg.out, mc["max_position_embeddings"])
    metrics = dict(target=name, out=cfg.out, tensors=len(tensors),
                   params=sum(t.numel() for t in tensors.values()), max_abs_logit_diff=None)

    # ---- verify: reload with transformers (and fla) and compare logits with ours
    device = "cuda" if torch.cuda.is_available() else "cpu"
    why_not = can_verify(name, device)
    if cfg.verify == "on" and why_not:
        raise RuntimeError(f"--verify=on: the {name} export cannot run here: {why_not}")
    if cfg.verify != "off" and not why_not:
        metrics["max_abs_logit_diff"] = verify(cfg.out, from_pretrained(cfg.input, device=device).eval(), device)
    elif cfg.verify == "auto":
        print(f"not verified here ({why_not}); on a GPU with fla: python export.py --input={cfg.input} "
              f"--out={cfg.out} --verify=on")
    print("final | " + " | ".join(f"{k} {v}" for k, v in metrics.items()))
    return metrics


if __name__ == "__main__":
    main(parse_args(Config))
