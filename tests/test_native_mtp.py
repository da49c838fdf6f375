"""Released MTP layers (DeepSeek-V3, GLM-4.5, Qwen3-Next, MiMo) on tiny models built here: wmtp's head 1 against references written from
the families' published descriptions and transformers' own `MtpModel`, training and export under the released names, a stranger's
folders, and the Medusa export of `mlp` heads against a forward written from vLLM's description."""
import copy, json, os, shutil, time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import wmtp_cli

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file

ENV = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "OMP_NUM_THREADS": "1"}
QUICK = ["--quick", "tracking.enabled=false", "max_steps=4", "save_interval=2", "optim.lr=3e-3"]

# The published descriptions (NATIVE_MTP.md; vLLM deepseek_mtp.py, glm4_moe_mtp.py, qwen3_next_mtp.py, mimo_mtp.py), written out
# here apart from wmtp's own table: module-0 prefix, embedding norm, hidden norm, projection, output norm, decoder-layer prefix,
# hidden first, zero-centred norms.
DESCRIBED = {
    "deepseek_v3": ("model.layers.{N}.", "enorm", "hnorm", "eh_proj", "shared_head.norm", "", False, False),
    "glm4_moe": ("model.layers.{N}.", "enorm", "hnorm", "eh_proj", "shared_head.norm", "", False, False),
    "qwen3_next": ("mtp.", "pre_fc_norm_embedding", "pre_fc_norm_hidden", "fc", "norm", "layers.0.", False, True),
    "mimo": ("model.mtp_layers.0.", "token_layernorm", "hidden_layernorm", "input_proj", "final_layernorm", "", True, False),
}


def _raw(folder: Path) -> dict:
    "Every tensor of a folder's safetensors files, by name."
    out = {}
    for f in sorted(folder.glob("*.safetensors")): out.update(load_file(str(f)))
    return out


def _trunk(folder: Path):
    "The family's trunk as transformers builds it (MiMo's is Qwen2's: built from its config under that class)."
    cfg = json.loads((folder / "config.json").read_text())
    if cfg["model_type"] != "mimo": return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    c = transformers.Qwen2Config(**{k: v for k, v in cfg.items() if k not in ("model_type", "architectures")})
    lm = transformers.Qwen2ForCausalLM(c).eval()
    raw = _raw(folder)
    lm.load_state_dict({k: raw[k] for k in lm.state_dict()})
    return lm


def reference_head1(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    "Head-1 logits [B,S,V] written from the published description: the trunk after its final norm, the family's norms, concat order and "
    "projection, the released decoder layer (the family's layer class, weights mapped here), the module's own output norm, the shared head."
    cfg = json.loads((folder / "config.json").read_text())
    family, N, eps = cfg["model_type"], cfg["num_hidden_layers"], cfg["rms_norm_eps"]
    pre, en, hn, proj, on, bp, hidden_first, zero_centred = DESCRIBED[family]
    pre, raw, lm = pre.format(N=N), _raw(folder), _trunk(folder)

    def rms(x, w):
        y = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
        return y * (1 + w) if zero_centred else y * w

    text = lm.config.get_text_config(decoder=True)
    bcfg = copy.deepcopy(text)
    bcfg.num_hidden_layers = 1
    if family in ("deepseek_v3", "glm4_moe"): bcfg.first_k_dense_replace = 0  # the MTP layer is MoE
    if getattr(bcfg, "layer_types", None) is not None: bcfg.layer_types = ["full_attention"]
    if family == "qwen3_next": bcfg.mlp_only_layers, bcfg.decoder_sparse_step = [], 1
    block = type(lm.model.layers[-1])(bcfg, 0).eval()
    sd, bpre = {}, pre + bp
    for k in block.state_dict():  # the released names: experts one by one, gate and up rows stacked into transformers' fused tensor
        if k.endswith("experts.gate_up_proj"):
            E, base = block.state_dict()[k].shape[0], bpre + k[:-len("gate_up_proj")]
            sd[k] = torch.stack([torch.cat([raw[f"{base}{e}.gate_proj.weight"], raw[f"{base}{e}.up_proj.weight"]]) for e in range(E)])
        elif k.endswith("experts.down_proj"):
            E, base = block.state_dict()[k].shape[0], bpre + k[:-len("down_proj")]
            sd[k] = torch.stack([raw[f"{base}{e}.down_proj.weight"] for e in range(E)])
        else: sd[k] = raw[bpre + k]
    block.load_state_dict(sd)
    S = ids.shape[1]
    pos = torch.arange(S)[None].expand(ids.shape[0], -1)
    with torch.no_grad():
        h = lm.model(ids).last_hidden_state  # after the final norm
        e = F.pad(lm.model.embed_tokens(ids[:, 1:]), (0, 0, 0, 1))  # token t+1; past the end zeros, as wmtp pads
        parts = [rms(h, raw[pre + hn + ".weight"]), rms(e, raw[pre + en + ".weight"])]
        x = torch.cat(parts if hidden_first else parts[::-1], -1) @ raw[pre + proj + ".weight"].T
        causal = torch.full((S, S), float("-inf")).triu(1)[None, None]  # an explicit causal mask: t sees 0..t
        y = block(x, attention_mask=causal, position_embeddings=lm.model.rotary_emb(x, pos), position_ids=pos)
        y = y if isinstance(y, torch.Tensor) else y[0]
        return rms(y, raw[pre + on + ".weight"]) @ raw["lm_head.weight"].T


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from wmtp.hf import tiny_model
    from wmtp.native_mtp import tiny_native_model
    d = tmp_path_factory.mktemp("native")
    tok = tiny_model(d / "llama", "llama")  # its tokenizer (384 tokens) goes into every folder
    out = {fam: tiny_native_model(d / fam, fam, tokenizer=tok) for fam in DESCRIBED}
    return {**out, "llama": tok, "root": d}


@pytest.mark.parametrize("family", list(DESCRIBED))
def test_head1_equals_the_published_description(folders, family):
    "wmtp.hf.from_pretrained's head-1 logits equal the reference forward of the family's MTP module, fp32, 1e-5."
    from wmtp.hf import from_pretrained
    m = from_pretrained(folders[family], dtype=torch.float32).eval()
    assert (m.n_future, m.cfg.heads, len(m.heads)) == (2, "sequential", 1)
    ids = torch.randint(0, 384, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(): ours = m(ids, logits="all").logits[:, :, 1]
    want = reference_head1(folders[family], ids)
    torch.testing.assert_close(ours, want, rtol=1e-5, atol=1e-5)
    assert (ours - m(ids, logits="all").logits[:, :, 0]).abs().max() > 1e-3  # head 1 is its own module, not head 0 again


@pytest.fixture(scope="module")
def released_index(tmp_path_factory):
    "DeepSeek-V3 and GLM-4.5-Air shapes at the released MTP index (61, 46 decoder layers), which transformers' MtpModel looks for."
    from wmtp.native_mtp import tiny_native_model
    d = tmp_path_factory.mktemp("deep")
    return {"deepseek_v3": tiny_native_model(d / "ds", "deepseek_v3", n_layer=61), "glm4_moe": tiny_native_model(d / "glm", "glm4_moe", n_layer=46)}


@pytest.mark.parametrize("family", ["deepseek_v3", "glm4_moe"])
def test_head1_equals_transformers_mtp_model(released_index, family):
    "Against transformers 5.24's own `MtpModel` (inference-only `use_mtp` code), which reads the module at the released index."
    from transformers.modeling_layers import MtpModel
    from wmtp.hf import from_pretrained
    folder = released_index[family]
    m = from_pretrained(folder, dtype=torch.float32).eval()
    lm = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    mtp = MtpModel.from_pretrained(lm).eval()
    ids = torch.randint(0, 384, (1, 10), generator=torch.Generator().manual_seed(1))
    pos = torch.arange(10)[None]
    with torch.no_grad():
        ours = m(ids, logits="all").logits[:, :-1, 1]
        h = lm.model(ids).last_hidden_state
        theirs = mtp._project_to_logits(mtp.forward_layer(0, h[:, :-1], pos[:, 1:], None, input_ids=ids[:, 1:]))
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours, reference_head1(folder, ids)[:, :-1], rtol=1e-5, atol=1e-5)


def test_train_and_export_keep_the_mtp_layer(folders, tmp_path):
    "Today's defect gone: after `wmtp train --quick` the export holds every MTP key, trained, under the released names, and declares it."
    from wmtp.hf import from_pretrained
    from wmtp.run import load_run
    src, run = folders["deepseek_v3"], tmp_path / "run"
    res = wmtp_cli("train", "--recipe", "pretrained", "--out", run, f"model.pretrained={src}", "model.heads=sequential", "model.n_future=2", *QUICK, env=ENV)
    assert res.returncode == 0, res.stderr[-3000:]
    exp = run / "hf"
    before, after = _raw(src), _raw(exp)
    mtp = sorted(k for k in before if k.startswith("model.layers.2."))
    assert len(mtp) == 32 and mtp == sorted(k for k in after if k.startswith("model.layers.2."))
    index = json.loads((exp / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(index) == set(after) and all((exp / f).is_file() for f in index.values())
    trained = ["eh_proj.weight", "enorm.weight", "hnorm.weight", "shared_head.norm.weight", "self_attn.q_a_proj.weight", "input_layernorm.weight"]
    for k in trained: assert not torch.equal(after["model.layers.2." + k], before["model.layers.2." + k]), k
    torch.testing.assert_close(after["model.layers.2.embed_tokens.weight"], after["model.embed_tokens.weight"], rtol=0, atol=0)
    torch.testing.assert_close(after["model.layers.2.shared_head.head.weight"], after["lm_head.weight"], rtol=0, atol=0)
    assert json.loads((exp / "config.json").read_text())["num_nextn_predict_layers"] == 1
    ids = torch.randint(0, 384, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ran = load_run(run).model(ids, logits="all").logits
        back = from_pretrained(exp).eval()(ids, logits="all").logits
        plain = transformers.AutoModelForCausalLM.from_pretrained(exp).eval()(ids).logits
    torch.testing.assert_close(back, ran, rtol=0, atol=0)  # the export reloads to the trained heads
    torch.testing.assert_close(plain, ran[:, :, 0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(reference_head1(exp, ids), ran[:, :, 1], rtol=1e-5, atol=1e-5)  # read by the description, as engines read it


def _one_line_error(res, *words):
    assert res.returncode == 2, (res.returncode, res.stderr[-2000:])
    lines = [l for l in res.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("wmtp train: error:") and "Traceback" not in res.stderr, res.stderr[-2000:]
    for w in words: assert w in lines[0], (w, lines[0])


def _crafted(folders, tmp_path):
    "The stranger's folders: an export whose mtp.json asks a billion heads, pickle-only weights, a config MTP count out of bounds, "
    "an MTP layer declared with no weights, a family wmtp does not know declaring one."
    llama, ds = folders["llama"], folders["deepseek_v3"]
    out = {}
    out["billion"] = d = tmp_path / "billion"; shutil.copytree(llama, d)
    (d / "mtp.json").write_text(json.dumps({"format": "wmtp.hf/1", "heads": "parallel", "n_future": 1_000_000_000, "n_head_layers": 1}))
    out["pickle"] = d = tmp_path / "pickle"; shutil.copytree(llama, d)
    torch.save(load_file(str(d / "model.safetensors")), d / "pytorch_model.bin"); (d / "model.safetensors").unlink()
    out["count"] = d = tmp_path / "count"; shutil.copytree(ds, d)
    c = json.loads((d / "config.json").read_text()); c["num_nextn_predict_layers"] = 1_000_000_000; (d / "config.json").write_text(json.dumps(c))
    out["missing"] = d = tmp_path / "missing"; shutil.copytree(ds, d)
    idx = json.loads((d / "model.safetensors.index.json").read_text())
    idx["weight_map"] = {k: v for k, v in idx["weight_map"].items() if not k.startswith("model.layers.2.")}
    (d / "model.safetensors.index.json").write_text(json.dumps(idx)); (d / "model-00002-of-00002.safetensors").unlink()
    out["unknown"] = d = tmp_path / "unknown"; shutil.copytree(llama, d)
    c = json.loads((d / "config.json").read_text()); c["num_nextn_predict_layers"] = 1; (d / "config.json").write_text(json.dumps(c))
    return out


EXPECT = {"billion": ["mtp.json: n_future=1000000000 is not an int in [1, 64]"], "pickle": ["pytorch_model.bin: the weights are a pickle"],
          "count": ["config.json: num_nextn_predict_layers=1000000000"], "missing": ["declares 1 MTP layer(s)", "no model.layers.2.* weights"],
          "unknown": ["'llama' model", "deepseek_v3, glm4_moe, qwen3_next, mimo"]}


def test_a_strangers_folders_are_refused(folders, tmp_path):
    "wmtp.hf.from_pretrained: a one-line error naming the file and the field, within seconds; wmtp train: the same, exit 2, nothing written."
    from wmtp.hf import from_pretrained
    crafted = _crafted(folders, tmp_path)
    for name, d in crafted.items():
        t = time.time()
        with pytest.raises(ValueError) as e: from_pretrained(d, **({} if name in ("billion", "count") else {"n_future": 2, "heads": "sequential"}))
        assert time.time() - t < 10 and "\n" not in str(e.value), (name, str(e.value))
        for w in EXPECT[name]: assert w in str(e.value), (name, w, str(e.value))
    for name, d in crafted.items():
        out = tmp_path / f"run-{name}"
        res = wmtp_cli("train", "--recipe", "pretrained", "--out", out, f"model.pretrained={d}", "model.heads=sequential", "model.n_future=2", *QUICK, env=ENV, timeout=120)
        _one_line_error(res, *EXPECT[name])
        assert not out.exists(), name


def test_parallel_heads_on_a_native_model_are_refused(folders, tmp_path):
    "heads=parallel with n_future > 1, or more heads than released modules: clear errors, nothing written; n_future=1 is the model alone."
    from wmtp.hf import from_pretrained
    ds = folders["deepseek_v3"]
    with pytest.raises(ValueError, match="not heads='parallel' with n_future=4"): from_pretrained(ds, n_future=4, heads="parallel")
    with pytest.raises(ValueError, match="n_future is at most 2"): from_pretrained(ds, n_future=3, heads="sequential")
    assert from_pretrained(ds, n_future=1).n_future == 1
    out = tmp_path / "run"
    _one_line_error(wmtp_cli("train", "--recipe", "pretrained", "--out", out, f"model.pretrained={ds}", *QUICK, env=ENV), "heads='sequential'")
    assert not out.exists()


def medusa_drafts(folder: Path, hidden: torch.Tensor) -> torch.Tensor:
    "Logits [..., K, V] of vLLM's Medusa written from its description (per head: num_hidden_layers residual blocks x + SiLU(W x), no bias, "
    "then lm_heads[i]), reading only the folder's config.json and model.safetensors."
    conf, sd = json.loads((folder / "config.json").read_text()), load_file(str(folder / "model.safetensors"))
    outs = []
    for i in range(conf["num_heads"]):
        x = hidden
        for l in range(conf["num_hidden_layers"]): x = x + F.silu(x @ sd[f"blocks.{i}.layers.{l}.weight"].T)
        outs.append(x @ sd[f"lm_heads.{i}.weight"].T)
    return torch.stack(outs, -2)


def test_medusa_export_of_mlp_heads(folders, tmp_path):
    "`wmtp export RUN --format medusa`: vLLM's layout, drafts equal wmtp's mlp heads on the same hidden states; other layouts refused."
    from wmtp.run import load_run
    run = tmp_path / "mlp"
    res = wmtp_cli("train", "--recipe", "pretrained", "--out", run, f"model.pretrained={folders['llama']}", "model.heads=mlp", "model.n_future=3",
                   "model.n_head_layers=2", *QUICK, env=ENV)
    assert res.returncode == 0, res.stderr[-3000:]
    res = wmtp_cli("export", run, "--format", "medusa", "--to", tmp_path / "medusa", env=ENV)
    assert res.returncode == 0, res.stderr[-3000:]
    conf = json.loads((tmp_path / "medusa" / "config.json").read_text())
    assert conf["model_type"] == "medusa" and (conf["num_heads"], conf["num_hidden_layers"], conf["hidden_size"], conf["vocab_size"]) == (2, 2, 64, 384)
    assert not [k for k in conf if k.startswith("num_") and k not in ("num_heads", "num_hidden_layers")]
    model = load_run(run).model
    assert model.heads[0].weight.abs().sum() > 0  # trained away from the zero start
    ids = torch.randint(0, 384, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = model(ids, logits="all")
        theirs = medusa_drafts(tmp_path / "medusa", out.hidden[:, :, 0])
    torch.testing.assert_close(theirs, out.logits[:, :, 1:], rtol=1e-5, atol=1e-5)
    assert torch.equal(theirs.argmax(-1), out.logits[:, :, 1:].argmax(-1))
    par = tmp_path / "par"
    assert wmtp_cli("train", "--recipe", "pretrained", "--out", par, f"model.pretrained={folders['llama']}", "model.n_future=2", *QUICK, env=ENV).returncode == 0
    res = wmtp_cli("export", par, "--format", "medusa", "--to", tmp_path / "no", env=ENV)
    assert res.returncode == 2 and "--format medusa writes mlp heads only" in res.stderr and "hf: a Hugging Face folder" in res.stderr
    assert not (tmp_path / "no").exists()


def _tf_forwards(folder: Path, prompt: torch.Tensor, use_mtp: bool, n: int = 30):
    "transformers' greedy generation from a folder, and how many forward passes of the main model it took."
    lm = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    calls = [0]
    lm.model.norm.register_forward_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))  # the main model's final norm: once a pass
    out = lm.generate(prompt, max_new_tokens=n, do_sample=False, use_mtp=use_mtp)
    return out, calls[0]


@pytest.mark.slow
@pytest.mark.parametrize("family,n_layer", [("deepseek_v3", 61), ("glm4_moe", 46)])
def test_transformers_use_mtp_reads_the_export(folders, tmp_path, family, n_layer):
    "`generate(..., use_mtp=True)` on the export of a model trained to repeat a text: output equal to greedy, drafts accepted "
    "(fewer main-model passes than tokens, and fewer than the untrained module needs)."
    from wmtp.hf import from_pretrained, load_tokenizer, save_hf
    from wmtp.native_mtp import tiny_native_model
    src = tiny_native_model(tmp_path / family, family, n_layer=n_layer, tokenizer=folders["llama"])
    tok = load_tokenizer(src)
    ids = torch.tensor([tok.encode("def add(a, b):\n    return a + b\n" * 8)[:96]])
    m = from_pretrained(src).train()
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    for _ in range(40):  # both heads learn the text
        lg = m(ids, logits="all").logits
        loss = sum(F.cross_entropy(lg[0, :ids.shape[1] - 1 - k, k], ids[0, 1 + k:]) for k in range(2))
        opt.zero_grad(); loss.backward(); opt.step()
    save_hf(m.eval(), tok, tmp_path / "exp")
    prompt = ids[:, :20]
    greedy, passes = _tf_forwards(tmp_path / "exp", prompt, False)
    drafted, mtp_passes = _tf_forwards(tmp_path / "exp", prompt, True)
    _, untrained = _tf_forwards(src, prompt, True)
    print(f"{family}: main-model passes for 30 tokens: greedy {passes}, use_mtp {mtp_passes} (untrained module: {untrained})")
    assert torch.equal(drafted, greedy) and passes == 30
    assert mtp_passes < 30 and mtp_passes < untrained


@pytest.mark.slow
def test_resume_after_kill_9_on_a_native_model(folders, tmp_path):
    "SIGKILL a DeepSeek-V3 run (its MTP layer trained as head 1) after a checkpoint, resume: weights and export equal a straight run's, bit for bit."
    import random, subprocess, sys
    from conftest import kill_once_written
    common = ["train", "--recipe", "pretrained", f"model.pretrained={folders['deepseek_v3']}", "model.heads=sequential", "model.n_future=2",
              "--quick", "tracking.enabled=false", "max_steps=16", "save_interval=4", "optim.lr=3e-3"]
    assert wmtp_cli(*common, "--out", tmp_path / "straight", env=ENV).returncode == 0
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "wmtp.cli", *map(str, common), "--out", str(out), "--resume"]
    kill_once_written(cmd, out / "checkpoints" / "step-8", env=ENV, then=random.Random(1).uniform(0.0, 0.2))
    assert not (out / "model.safetensors").exists()
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=ENV)
    assert res.returncode == 0 and "resumed from" in res.stdout, res.stderr[-3000:]
    for f, key in (("model.safetensors", "heads.0.combine.weight"), ("hf/model-00002-of-00002.safetensors", "model.layers.2.eh_proj.weight")):
        a, b = load_file(str(tmp_path / "straight" / f)), load_file(str(out / f))
        assert key in a and sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a), f


@pytest.mark.slow
def test_fsdp2_two_processes_equal_one_on_a_native_model(folders, tmp_path):
    "torchrun, 2 gloo processes, the MTP layer sharded as one block: logged training metrics (rtol 1e-5), validation and weights equal 1 process."
    import subprocess, sys
    from conftest import free_port, logged_training_metrics, assert_same_training_metrics
    args = ["train", "--recipe", "pretrained", f"model.pretrained={folders['deepseek_v3']}", "model.heads=sequential", "model.n_future=2",
            "--quick", "tracking.log_every=1", "max_steps=6", "save_interval=3", "optim.lr=3e-3"]
    assert wmtp_cli(*args, "--out", tmp_path / "one", env=ENV).returncode == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           "-m", "wmtp.cli", *map(str, args), "--out", str(tmp_path / "two")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=ENV)
    assert res.returncode == 0, res.stderr[-3000:]
    i1, i2 = (json.loads((tmp_path / d / "run.json").read_text()) for d in ("one", "two"))
    assert i2["world_size"] == 2
    worst = assert_same_training_metrics(logged_training_metrics(tmp_path / "one"), logged_training_metrics(tmp_path / "two"), rtol=1e-5)
    print(f"largest relative difference of the logged training metrics, 2 processes vs 1: {worst:.2e}")
    torch.testing.assert_close(torch.tensor(i2["final_val_loss_per_head"]), torch.tensor(i1["final_val_loss_per_head"]), rtol=1e-5, atol=0)
    a, b = load_file(str(tmp_path / "one" / "model.safetensors")), load_file(str(tmp_path / "two" / "model.safetensors"))
    assert sorted(a) == sorted(b) and any(k.startswith("heads.0.") for k in a)
    for k in a: torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-5)


def test_mimo_trains_and_exports_without_remote_code(folders, tmp_path):
    "`wmtp train` on a MiMo folder (model_type mimo, no remote code): its MTP layer trains as head 1 and goes back under model.mtp_layers.0."
    run = tmp_path / "run"
    res = wmtp_cli("train", "--recipe", "pretrained", "--out", run, f"model.pretrained={folders['mimo']}", "model.heads=sequential", "model.n_future=2",
                   *QUICK, env=ENV)
    assert res.returncode == 0, res.stderr[-3000:]
    before, after = _raw(folders["mimo"]), _raw(run / "hf")
    keys = sorted(k for k in before if k.startswith("model.mtp_layers."))
    assert keys and keys == sorted(k for k in after if k.startswith("model.mtp_layers."))
    assert not torch.equal(after["model.mtp_layers.0.input_proj.weight"], before["model.mtp_layers.0.input_proj.weight"])
    assert json.loads((run / "hf" / "config.json").read_text())["model_type"] == "mimo"


@pytest.mark.slow
@pytest.mark.parametrize("recipe,extra", [("critic", ["data.n_tasks=24"]), ("rho1_weighted", ["reference=SRC"]), ("baseline", ["model.train=heads"]),
                                          ("baseline", ["loss.path=per_head"]), ("baseline", ["loss.path=flatten"])])
def test_every_algorithm_trains_the_native_layer(folders, tmp_path, recipe, extra):
    "critic, rho1 (the model itself, alone, as reference), heads-only training and the loss paths on a DeepSeek-V3 with its MTP layer as head 1."
    src = folders["deepseek_v3"]
    out = tmp_path / "run"
    res = wmtp_cli("train", "--recipe", recipe, "--out", out, f"model.pretrained={src}", "model.heads=sequential", "model.n_future=2",
                   *QUICK, *[e.replace("SRC", str(src)) for e in extra], env=ENV)
    assert res.returncode == 0, res.stderr[-3000:]
    info = json.loads((out / "run.json").read_text())
    assert info["recipe"]["algorithm"] == recipe.replace("_", "-") and all(v == v and v > 0 for v in info["final_val_loss_per_head"])
    before, after = _raw(src), _raw(out / "hf")
    assert not torch.equal(after["model.layers.2.eh_proj.weight"], before["model.layers.2.eh_proj.weight"])
    if "model.train=heads" in extra: assert torch.equal(after["model.layers.1.self_attn.o_proj.weight"], before["model.layers.1.self_attn.o_proj.weight"])


def test_qwen3_next_without_a_count_field(folders, tmp_path):
    "Qwen3-Next's release names no MTP count in config.json (vLLM assumes 1): the checkpoint's mtp.* keys load as head 1, and export back."
    from wmtp.hf import from_pretrained, save_hf
    d = tmp_path / "qn"
    shutil.copytree(folders["qwen3_next"], d)
    c = json.loads((d / "config.json").read_text()); del c["num_nextn_predict_layers"]; (d / "config.json").write_text(json.dumps(c))
    m = from_pretrained(d).eval()
    assert m.n_future == 2
    ids = torch.randint(0, 384, (2, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad(): ours = m(ids, logits="all").logits
    torch.testing.assert_close(ours[:, :, 1], reference_head1(d, ids), rtol=1e-5, atol=1e-5)
    save_hf(m, None, tmp_path / "exp")
    assert sorted(k for k in _raw(tmp_path / "exp") if k.startswith("mtp.")) == sorted(k for k in _raw(d) if k.startswith("mtp."))
    with torch.no_grad(): torch.testing.assert_close(from_pretrained(tmp_path / "exp").eval()(ids, logits="all").logits, ours, rtol=0, atol=0)
