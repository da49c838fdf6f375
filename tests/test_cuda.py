"""Decoding on an NVIDIA GPU: speculative output equals greedy (native layouts, batched rows with ragged acceptance, a `wmtp.hf`
model against transformers' own greedy), speculative sampling runs on a CUDA generator, and a speculative pass reads the host once.
Skipped where there is no CUDA (CI has none); `.ci/gpu_checks.sh` runs it on a machine that has one."""
import warnings

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

from wmtp.bench import BENCH_SIZES, _train_repetitive
from wmtp.model import HEAD_LAYOUTS, MTPConfig, MTPTransformer

DEV = "cuda"


@pytest.fixture(scope="module", params=HEAD_LAYOUTS)
def trained(request):
    "A small model of each head layout trained on CUDA until its heads' drafts are accepted, and the window it learnt."
    d = BENCH_SIZES["quick"]["decode"]
    model, x, loss, steps = _train_repetitive(DEV, d, request.param)
    return request.param, model, x, d


def test_speculative_equals_greedy_on_cuda(trained):
    "Three prompts from different offsets of the learnt window decode speculatively as one batch, each row equal to its own greedy run."
    heads, model, x, d = trained
    P, N = d["prompt"], d["new_tokens"] - 16  # room for the largest offset inside max_seq_len
    prompts = torch.cat([x[:, o:o + P] for o in (0, 5, 11)])
    spec, st = model.generate(prompts, N, speculative=True, return_stats=True)
    for b in range(len(prompts)): assert torch.equal(spec[b], model.generate(prompts[b:b + 1], N)[0]), (heads, b)
    print(f"{heads}: {st['tokens_per_forward']:.2f} tokens per forward over 3 rows")
    assert st["tokens_per_forward"] > 1.5  # the heads were trained: drafts were accepted, so the rows' acceptance differed pass by pass


def _syncs(fn) -> int:
    "Host syncs that `fn` makes on CUDA, counted by torch's sync debug mode."
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try: fn()
        finally: torch.cuda.set_sync_debug_mode(0)
    return sum("synchroniz" in str(m.message) for m in w)


def test_one_host_sync_per_pass(trained):
    "A batched speculative pass reads the host once (whether to go on, the next pass's size); a fixed number more at the start and end."
    heads, model, x, d = trained
    if heads == "sequential": pytest.skip("sequential modules draft one after the other, one sequence at a time")
    P, N = d["prompt"], d["new_tokens"]
    prompt = x[:, :P]
    _, st = model.generate(prompt, N, speculative=True, return_stats=True)
    n = _syncs(lambda: model.generate(prompt, N, speculative=True))
    g = _syncs(lambda: model.generate(prompt, N))
    print(f"{heads}: {n} host syncs in {st['forward_passes']} speculative passes; greedy: {g} syncs for {N} tokens")
    assert n <= st["forward_passes"] + 8, (n, st["forward_passes"])


def test_speculative_sampling_on_cuda(trained):
    "Sampling speculatively with a CUDA generator: tokens in the vocabulary, repeatable from the seed; temperature 0 equals greedy."
    heads, model, x, d = trained
    if heads == "sequential": pytest.skip("sequential modules draft greedily")
    prompt, N = x[:, :d["prompt"]], 24
    runs = [model.generate(prompt, N, speculative=True, temperature=0.8, top_k=20, generator=torch.Generator(DEV).manual_seed(3)) for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
    assert int(runs[0].min()) >= 0 and int(runs[0].max()) < model.cfg.vocab_size
    cold = model.generate(prompt, N, speculative=True, temperature=0.0, generator=torch.Generator(DEV).manual_seed(3))
    assert torch.equal(cold, model.generate(prompt, N))


def test_hf_model_decodes_on_cuda():
    "A tiny transformers Llama with parallel and MLP heads on CUDA: wmtp greedy equals transformers' greedy, speculative equals both."
    transformers = pytest.importorskip("transformers")
    from wmtp.hf import HFMTPModel
    torch.manual_seed(0)
    cfg = transformers.AutoConfig.for_model("llama", vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                            pad_token_id=1, bos_token_id=0, eos_token_id=0)
    lm = transformers.AutoModelForCausalLM.from_config(cfg).to(DEV).eval()
    prompt = torch.randint(2, 384, (1, 12), generator=torch.Generator().manual_seed(0)).to(DEV)
    ref = lm.generate(prompt, do_sample=False, max_new_tokens=20, min_new_tokens=20, eos_token_id=None, pad_token_id=1)
    for heads in ("parallel", "mlp"):
        m = HFMTPModel(lm, n_future=3, heads=heads).to(DEV).eval()
        assert torch.equal(m.generate(prompt, 20), ref), heads
        assert torch.equal(m.generate(prompt, 20, speculative=True), ref), heads
