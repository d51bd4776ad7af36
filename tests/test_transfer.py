"""transfer.py (Stage 0) on the tiny teacher: Q and O copied, K and V repeated over the GQA groups in HF's
repeat_kv order, everything that is not attention the teacher's, and the teacher's identity recorded."""

import os

import numpy as np
import torch

from common import fingerprint
from model import load_checkpoint
from teachers import from_pretrained


def test_transfer_copies_weights(aligned):
    path = os.path.join(aligned.dir, "transfer", "ckpt.pt")
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert raw["stage"] == "transfer" and raw["config"]["teacher"] == aligned.teacher
    # the teacher's identity travels with every checkpoint: later stages refuse another teacher
    assert raw["teacher"] == {"source": aligned.teacher, "fingerprint": fingerprint(from_pretrained(aligned.teacher))}
    student, ckpt = load_checkpoint(path)
    teacher = from_pretrained(aligned.teacher)
    c = teacher.config
    n_rep = c.num_attention_heads // c.num_key_value_heads
    assert n_rep == 2 and student.config.mixers == ["gla"] * c.num_hidden_layers
    for ls, lt in zip(student.model.layers, teacher.model.layers):
        s, t = ls.self_attn, lt.self_attn
        assert torch.equal(s.q_proj.weight, t.q_proj.weight) and torch.equal(s.o_proj.weight, t.o_proj.weight)
        for name in ("k_proj", "v_proj"):
            w_s = getattr(s, name).weight.view(c.num_attention_heads, c.head_dim, -1)
            w_t = getattr(t, name).weight.view(c.num_key_value_heads, c.head_dim, -1)
            for h in range(c.num_attention_heads):   # query head h reads kv head h // n_rep (HF repeat_kv)
                assert torch.equal(w_s[h], w_t[h // n_rep]), (name, h)
        assert torch.equal(s.g_norm.weight, torch.ones_like(s.g_norm.weight))
    ts = teacher.state_dict()
    for name, p in student.state_dict().items():
        if ".self_attn." not in name:
            assert torch.equal(p, ts[name]), name
    idx = torch.randint(0, c.vocab_size, (2, 20))
    assert torch.isfinite(student(idx)).all()
    assert np.isfinite(aligned.transfer["probe_kl"])
