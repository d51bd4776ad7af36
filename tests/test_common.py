"""The shared --key=value parser: typed values, unknown keys and bad values rejected with the valid keys listed."""

import dataclasses

import pytest
import torch

from common import inherit, parse_args


@dataclasses.dataclass
class Config:
    steps: int = 10          # an int
    lr: float = 1e-3         # a float
    compile: bool = False    # a bool
    teacher: str = ""        # a string, "" = inherit
    layers: str = ""         # a comma list kept as text


def test_parse_typed_values():
    cfg = parse_args(Config, ["--steps=5", "--lr=2e-4", "--compile=true", "--teacher=a/b", "--layers=1,2"])
    assert (cfg.steps, cfg.lr, cfg.compile, cfg.teacher, cfg.layers) == (5, 2e-4, True, "a/b", "1,2")
    assert parse_args(Config, []) == Config()


@pytest.mark.parametrize("argv, message", [
    (["--stepz=5"], "unknown key --stepz"),
    (["--steps=five"], "--steps takes an integer"),
    (["--lr=fast"], "--lr takes a number"),
    (["--compile=maybe"], "--compile takes true or false"),
    (["steps=5"], "expected --key=value"),
])
def test_bad_flags_name_the_problem_and_the_valid_keys(argv, message):
    with pytest.raises(SystemExit) as e:
        parse_args(Config, argv)
    assert message in str(e.value) and "--steps, --lr, --compile, --teacher, --layers" in str(e.value)


def test_inherit_fills_only_unset_fields(capsys):
    cfg = Config(steps=7)
    inherit(cfg, {"teacher": "smollm2", "steps": 3}, ["teacher", "steps"])
    assert cfg.teacher == "smollm2" and cfg.steps == 7
    assert "inherited teacher" in capsys.readouterr().out


STAGES = ("data", "transfer", "align", "score", "select_layers", "distill", "finetune", "eval")


def test_help_lists_every_key_with_its_default_and_comment(capsys):
    import distill
    with pytest.raises(SystemExit) as e:
        parse_args(distill.Config, ["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "Stage 2: KL distillation" in out
    assert "--lr_mixer=0.0001" in out and "lr of self_attn.* and input_layernorm (RADLADS step 2)" in out
    assert all(f"--{f.name}=" in out for f in dataclasses.fields(distill.Config))


@pytest.mark.parametrize("stage", STAGES)
def test_no_flag_is_an_abbreviation_of_a_torchrun_option(stage):
    """torchrun's parser reads every --x before the script's own flags end as a possible abbreviation of its
    options: a flag --run=... stops it ("ambiguous option: --run could match --run-path, --run_path")."""
    import importlib

    from torch.distributed.run import get_args_parser
    options = [s for a in get_args_parser()._actions for s in a.option_strings]
    Config = importlib.import_module(stage).Config
    for f in dataclasses.fields(Config):
        clash = [o for o in options if o.startswith(f"--{f.name}") or o.startswith(f"--{f.name.replace('_', '-')}")]
        assert not clash, f"{stage}.py --{f.name} would be read by torchrun as {clash}"
    parser = get_args_parser()
    args = parser.parse_args(["--standalone", "--nproc_per_node=2", f"{stage}.py"] +
                             [f"--{f.name}=1" for f in dataclasses.fields(Config)])
    assert args.training_script == f"{stage}.py" and len(args.training_script_args) == len(dataclasses.fields(Config))


def test_one_writer_per_folder(tmp_path):
    import json
    import os
    import socket
    import subprocess
    import sys

    from common import lock_folder
    folder = tmp_path / "run"
    release = lock_folder(str(folder), "test")
    # a second process is refused, with the owner's pid and what to do
    code = (f"import sys; sys.path.insert(0, {os.getcwd()!r}); from common import lock_folder; "
            f"lock_folder({str(folder)!r}, 'x')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode != 0 and f"pid {os.getpid()}" in r.stderr and "kill" in r.stderr
    release()
    assert not (folder / ".lock").exists()
    # a lock left by a process that is gone is taken over
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (folder / ".lock").write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname(), "what": "old"}))
    lock_folder(str(folder), "test")()
    # an output folder that cannot be made is found before any work
    (tmp_path / "file").write_text("")
    with pytest.raises(PermissionError, match="writable --out_dir"):
        lock_folder(str(tmp_path / "file" / "run"), "test")


def test_atomic_write_leaves_the_old_file_on_failure(tmp_path):
    import os

    from common import atomic_write, write_json
    path = str(tmp_path / "x.json")
    write_json(path, {"a": 1})

    def broken(tmp):
        open(tmp, "w").write("half")
        raise OSError("disk full")
    with pytest.raises(OSError):
        atomic_write(path, broken)
    assert open(path).read().startswith("{") and os.listdir(tmp_path) == ["x.json"]


def test_meta_json_that_does_not_describe_the_checkpoint_is_not_believed(tmp_path):
    """A kill between writing ckpt.pt and meta.json leaves meta.json one step behind: checkpoint_info sees it."""
    import json

    import torch

    from model import ModelConfig, Transformer, checkpoint_info, save_checkpoint
    m = Transformer(ModelConfig(arch="llama", vocab_size=11, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                num_attention_heads=2, num_key_value_heads=1, head_dim=4))
    path = str(tmp_path / "ckpt.pt")
    save_checkpoint(path, m, stage="a", config={}, parent=None, metrics={"step": 1}, tokenizer="")
    meta = (tmp_path / "meta.json").read_text()
    save_checkpoint(path, m, stage="a", config={}, parent=None, metrics={"step": 2}, tokenizer="")
    assert checkpoint_info(path)["metrics"]["step"] == 2
    (tmp_path / "meta.json").write_text(meta)           # as if the second meta.json never got written
    assert json.loads(meta)["metrics"]["step"] == 1 and checkpoint_info(path)["metrics"]["step"] == 2
    with torch.no_grad():
        m.lm_head.weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="not writing"):
        save_checkpoint(path, m, stage="a", config={}, parent=None, metrics={"step": 3}, tokenizer="")
    assert checkpoint_info(path)["metrics"]["step"] == 2


def test_want_graph_says_where_the_step_is_a_cuda_graph():
    from common import Dist, want_graph
    one, ddp, cpu = Dist(0, 1, "cuda:0"), Dist(0, 2, "cuda:0"), Dist(0, 1, "cpu")
    assert want_graph("auto", one) and want_graph("auto", ddp) and not want_graph("auto", cpu)
    assert want_graph("true", ddp) and not want_graph("false", one) and not want_graph("auto", ddp, shard=True)
    with pytest.raises(ValueError, match="CUDA graphs record GPU kernels"):
        want_graph("true", cpu)
    with pytest.raises(ValueError, match="FSDP2"):
        want_graph("true", ddp, shard=True)


def test_a_resumed_optimizer_takes_this_runs_settings():
    """A mid-run optimizer state written on a GPU (fused, capturable, step counters on the device) resumes on the
    CPU with the CPU's settings, and the step after it runs; one written before the CUDA-graph step (capturable off)
    resumes on a GPU capturable, which a recorded step needs."""
    from common import Dist, load_optimizer
    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([w], lr=0.1)
    w.grad = torch.ones(3)
    opt.step()
    state = opt.state_dict()
    for g in state["param_groups"]:
        g["fused"] = g["capturable"] = True           # as a GPU run writes it
    new = torch.optim.AdamW([w], lr=0.1)
    load_optimizer(new, None, state, Dist(0, 1, "cpu"), shard=False)
    assert [(g["fused"], g["capturable"]) for g in new.param_groups] == [(False, False)]
    assert new.state[w]["step"].device.type == "cpu" and new.state[w]["step"].dtype == torch.float32
    w.grad = torch.ones(3)
    new.step()
    assert float(new.state[w]["step"]) == 2


def test_a_resumed_optimizer_keeps_its_lr_tensor():
    """align.py's recorded step reads the lr from a tensor: resuming fills that same tensor with the saved lr
    (replacing it by the saved value would leave the recorded step reading a tensor nobody updates)."""
    from common import Dist, load_optimizer
    w = torch.nn.Parameter(torch.ones(3))
    old = torch.optim.AdamW([w], lr=0.25)
    state = old.state_dict()
    lr = torch.tensor(1.0)
    new = torch.optim.AdamW([w], lr=lr)
    load_optimizer(new, None, state, Dist(0, 1, "cpu"), shard=False)
    assert new.param_groups[0]["lr"] is lr and float(lr) == 0.25
    plain = torch.optim.AdamW([w], lr=1.0)
    load_optimizer(plain, None, state, Dist(0, 1, "cpu"), shard=False)
    assert plain.param_groups[0]["lr"] == 0.25 and not torch.is_tensor(plain.param_groups[0]["lr"])
