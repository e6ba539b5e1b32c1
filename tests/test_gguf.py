"""GGUF through llama.cpp's own tools: its converter, llama-quantize with quantfarm's importance matrix,
llama-perplexity and llama-completion as the readers. The tools are built once by `make llama-tools`
(QUANTFARM_LLAMA_CPP names them); where they are missing these tests skip with the reason, and fail
under CI=true."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from core.errors import SpecError
from quantizers import imatrix as imx
from quantizers import llama_cpp, moe
from quantizers.formats import gguf as fmt

sys.path.insert(0, str(Path(__file__).parent))
import tiny  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
PROMPT = "The capital of France is"
CHUNKS = 8          # llama-perplexity's windows of 512 WikiText-2 tokens for every SmolLM2 perplexity and KLD here


@pytest.fixture(scope="session")
def tools():
    try:
        return llama_cpp.tools()
    except llama_cpp.ToolsUnavailable as e:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{e}; CI=true requires llama.cpp's tools")
        pytest.skip(str(e))


def gguf_types(path) -> dict[str, str]:
    import gguf
    return {x.name: x.tensor_type.name for x in gguf.GGUFReader(str(path)).tensors}


# ---- settings and files, no tools

def test_build_flags_never_enable_amx(tmp_path):
    """llama-tools' flags come from the CPU's instruction sets, and AMX stays off even where the CPU has it
    (ggml's AMX matmul crashes on such Xeons): a Sapphire Rapids flag line and an AVX2-only one."""
    script = Path(__file__).parent.parent / "envs" / "llama-cpp-flags.sh"
    def flags(line: str) -> dict:
        (tmp_path / "cpuinfo").write_text(f"processor\t: 0\nflags\t\t: {line}\n")
        out = subprocess.run(["sh", str(script), str(tmp_path / "cpuinfo")], capture_output=True, text=True, check=True)
        return dict(f.removeprefix("-D").split("=") for f in out.stdout.split())
    spr = flags("fpu sse4_2 avx f16c fma bmi2 avx2 avx_vnni avx512f avx512cd avx512vl avx512dq avx512bw avx512vbmi "
                "avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8")
    assert spr["GGML_NATIVE"] == "OFF" and spr["GGML_AVX512"] == spr["GGML_AVX512_BF16"] == spr["GGML_AVX_VNNI"] == "ON"
    assert spr["GGML_AMX_TILE"] == spr["GGML_AMX_INT8"] == spr["GGML_AMX_BF16"] == "OFF"
    avx2 = flags("fpu sse4_2 avx f16c fma bmi2 avx2")
    assert avx2["GGML_AVX2"] == "ON" and avx2["GGML_AVX512"] == avx2["GGML_AVX512_VNNI"] == "OFF"


def test_a_crashed_tool_names_itself_its_signal_and_the_fix():
    """A tool killed by a signal is reported by name and signal with what to do, not as a bare exit -11."""
    segv = [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"]
    with pytest.raises(llama_cpp.QuantizationError) as e:
        llama_cpp._run(segv, "llama-perplexity on x.gguf")
    msg = str(e.value)
    assert "llama-perplexity on x.gguf crashed (SIGSEGV, signal 11)" in msg and "make llama-tools" in msg
    killed = [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"]
    with pytest.raises(llama_cpp.QuantizationError, match=r"crashed \(SIGKILL, signal 9\): most often .*out-of-memory"):
        llama_cpp._run(killed, "llama-quantize")
    with pytest.raises(llama_cpp.QuantizationError, match=r"llama-quantize failed \(exit 3\)"):
        llama_cpp._run([sys.executable, "-c", "raise SystemExit(3)"], "llama-quantize")


def test_spec_refuses_what_gguf_cannot_take():
    from service.job.spec import JobSpec
    s = JobSpec(model="m", format="gguf", gguf_type="q3_k_m")
    assert s.gguf_type == "Q3_K_M" and s.label() == "gguf-q3_k_m" and s.imatrix == "quantfarm"
    assert "bits" not in s.recipe("r") and s.recipe("r")["gguf_type"] == "Q3_K_M"
    assert "calibration" not in JobSpec(model="m", format="gguf", imatrix="none").recipe("r")
    # the other formats' recipe keys do not change with the GGUF fields
    assert set(JobSpec(model="m").recipe("r")) & {"gguf_type", "imatrix", "gguf_shard"} == set()
    for bad, why in [(dict(format="gguf", bits=8), "not used by format gguf"),
                     (dict(format="gguf", group_size=64), "not used by format gguf"),
                     (dict(gguf_type="Q4_K_M"), "only for format gguf"),
                     (dict(format="gguf", gguf_type="Q9_K"), "unknown GGUF type"),
                     (dict(format="gguf", gguf_type="IQ2_XS", imatrix="none"), "needs an importance matrix"),
                     (dict(format="gguf", gguf_shard="5T"), "gguf_shard")]:
        with pytest.raises(ValueError, match=why):
            JobSpec(model="m", **bad)


def test_fallbacks_follow_llama_quantize_rules():
    widths = {"q_proj": 576, "down_proj": 1536, "odd": 100}
    assert fmt.fallbacks("Q4_K_M", widths) == {"q_proj": "Q5_0", "odd": "F16"}
    assert fmt.fallbacks("Q2_K", widths) == {"q_proj": "Q4_0", "odd": "F16"}
    assert fmt.fallbacks("IQ4_XS", widths) == {"q_proj": "IQ4_NL", "odd": "F16"}
    assert fmt.fallbacks("Q8_0", widths) == {"odd": "F16"}
    assert "576 wide" in fmt.fallback_note("Q6_K", widths) and fmt.fallback_note("F16", widths) is None
    with pytest.raises(SpecError, match="unknown GGUF type"):
        fmt.gguf_type("Q7_K")


def test_imatrix_file_holds_means_per_expert(tmp_path):
    """Sums and counts per weight, experts stacked by index: read back as llama-quantize does (sum / count)."""
    stats = {"model.layers.0.self_attn.q_proj": imx.Stat(torch.tensor([4.0, 8.0], dtype=torch.float64), 2),
             "model.layers.0.mlp.experts.1.down_proj": imx.Stat(torch.tensor([9.0, 3.0], dtype=torch.float64), 3),
             "model.layers.0.mlp.experts.0.down_proj": imx.Stat(torch.tensor([1.0, 1.0], dtype=torch.float64), 1)}
    table = imx.entries(stats, fmt.name_map("qwen2moe", 1))
    assert set(table) == {"blk.0.attn_q.weight", "blk.0.ffn_down_exps.weight"}
    imx.write(tmp_path / "m.gguf", table, "c4", chunk_count=3, chunk_size=512)
    back = imx.read(tmp_path / "m.gguf")
    np.testing.assert_allclose(back["blk.0.attn_q.weight"], [[2.0, 4.0]])
    np.testing.assert_allclose(back["blk.0.ffn_down_exps.weight"], [[1.0, 1.0], [3.0, 1.0]])


def test_collect_counts_each_experts_routed_tokens():
    model = tiny.tiny_moe("qwen3_moe")
    moe.unfuse_experts(model)
    tokens = tiny.calib(4, 16)
    stats = imx.collect(model, tokens)
    dense = stats["model.layers.0.self_attn.q_proj"]
    assert dense.count == 64
    x = model.model.embed_tokens(tokens).reshape(-1, tiny.HIDDEN)       # layer 0's q_proj input, after the norm
    h = model.model.layers[0].input_layernorm(x)
    torch.testing.assert_close(dense.sum_sq, h.double().pow(2).sum(0), rtol=1e-4, atol=1e-4)
    experts = [stats[f"model.layers.0.mlp.experts.{e}.gate_proj"].count for e in range(tiny.EXPERTS)
               if f"model.layers.0.mlp.experts.{e}.gate_proj" in stats]
    assert sum(experts) == 64 * tiny.TOP_K                               # every token reaches its top-k experts


# ---- SmolLM2 through llama.cpp

@pytest.fixture(scope="module")
def smol_f16(tools, smol, tmp_path_factory):
    """SmolLM2's F16 GGUF (llama.cpp's converter), quantfarm's importance matrix for it, held-out text."""
    from types import SimpleNamespace

    from service.job.loading import fp16_folder
    from service.job.models import resolve_model
    d = tmp_path_factory.mktemp("smol-gguf")
    f16 = d / "f16.gguf"
    llama_cpp.convert(tools, fp16_folder(resolve_model("smollm2-135m")), f16, "SmolLM2-135M")
    mat = imx.make_file("quantfarm", smol.model, smol.calib, f16, smol.tok, tools, "cpu", d / "imatrix.gguf")
    text = d / "eval.txt"
    text.write_text(smol.tok.decode(smol.ev[:40 * 1024], skip_special_tokens=True))
    base = llama_cpp.perplexity(tools, f16, text, 512, CHUNKS, save_base=d / "base.bin")
    return SimpleNamespace(dir=d, f16=f16, imatrix=mat, text=text, base=base, kld_base=d / "base.bin")


@pytest.fixture(scope="module")
def with_our_matrix(tools, smol_f16):
    """with_our_matrix(type) -> namespace(path, log, kld): SmolLM2 quantized by llama-quantize with quantfarm's
    matrix, and llama-perplexity's KLD run against the F16 logits (its PPL(Q) is the perplexity of the same
    CHUNKS x 512 tokens that a plain run on smol_f16.text computes), made once for the tests that share it."""
    from types import SimpleNamespace
    made = {}

    def get(typ: str):
        if typ not in made:
            q = smol_f16.dir / f"{typ}.gguf"
            out = subprocess.run([tools.bin("llama-quantize"), "--imatrix", str(smol_f16.imatrix),
                                  str(smol_f16.f16), str(q), typ, "2"], capture_output=True, text=True)
            assert out.returncode == 0, out.stderr[-2000:]
            made[typ] = SimpleNamespace(path=q, log=out.stdout + out.stderr,
                                        kld=llama_cpp.perplexity(tools, q, None, 512, CHUNKS, kld_base=smol_f16.kld_base))
        return made[typ]
    return get


@pytest.mark.slow
def test_preset_types_convert_quantize_and_run_in_llama_cpp(tools, smol, smol_f16, with_our_matrix):
    """Each type of the `gguf` preset: llama-quantize takes our matrix (all its entries), the tensors get the
    type or the fallback preflight predicted, and llama.cpp generates and evaluates the file."""
    from service.job.gguf_job import input_widths
    widths = input_widths(smol.model)
    to_gguf = fmt.name_map("llama", 30)
    f16_text = llama_cpp.generate(tools, smol_f16.f16, PROMPT, 8)
    ppl = {}
    for typ in fmt.PRESET:
        made = with_our_matrix(typ)
        q = made.path
        # 30 layers x 7 Linears; the tied head is token_embd, which the file does not multiply as a weight
        assert "loaded 210 importance matrix entries" in made.log
        types, predicted = gguf_types(q), fmt.fallbacks(typ, widths)
        main = {"Q2_K": "Q2_K", "Q3_K_M": "Q3_K", "Q4_K_M": "Q4_K", "Q5_K_M": "Q5_K", "Q6_K": "Q6_K",
                "Q8_0": "Q8_0"}[typ]
        for kind in widths:                                 # layer 10: past the first layers the _M mixes raise
            name = to_gguf(f"model.layers.10.{'self_attn' if kind[0] in 'qkvo' else 'mlp'}.{kind}") + ".weight"
            got = types[name]
            if kind in ("q_proj", "k_proj", "gate_proj", "up_proj"):      # the type itself in every mix
                assert got == predicted.get(kind, main), (typ, kind, got)
            else:                                           # v/o/down: a mix may raise them; never left 16-bit
                assert got not in ("F16", "F32", "BF16"), (typ, kind, got)
        text = llama_cpp.generate(tools, q, PROMPT, 8)
        assert len(text.strip()) > 0
        r = made.kld
        ppl[typ] = r["perplexity"]
        assert 0 <= r["kld"] < 1.0
        if typ == "Q8_0":
            assert text.strip() == f16_text.strip()         # greedy: Q8_0 keeps F16's continuation
            assert abs(r["perplexity"] / smol_f16.base["perplexity"] - 1) < 0.01
    print(ppl, "F16", smol_f16.base["perplexity"])
    order = [ppl[t] for t in fmt.PRESET]                    # more bits, lower perplexity
    assert order == sorted(order, reverse=True), ppl


@pytest.mark.slow
def test_quantfarm_imatrix_beats_none_and_matches_llama_imatrix(tools, smol, smol_f16, with_our_matrix):
    """Held-out perplexity (llama-perplexity, CHUNKS x 512 WikiText-2 tokens) at Q2_K, Q3_K_M and Q4_K_M: with
    quantfarm's matrix no worse than with llama-imatrix's on the same calibration text, and clearly better
    than none. Both matrices are the same statistic of the same tokens, so they differ in rounding only, and
    llama-quantize's discrete scale search turns that into perplexities 0.1-0.2% apart either way (measured on
    16 chunks: accumulating our sums in float64 instead of float32 moved Q2_K from 17.941 to 17.904, llama's
    17.925): "no worse" allows 0.5%, about a quarter of the gap to no matrix at Q4_K_M (8 chunks, 8 x 512
    calibration: quantfarm 15.886, llama 15.938, none 16.189)."""
    from quantizers.imatrix import make_file as make_imatrix
    theirs = make_imatrix("llama", smol.model, smol.calib, smol_f16.f16, smol.tok, tools, "cpu",
                          smol_f16.dir / "imatrix-llama.gguf")
    assert set(imx.read(theirs)) >= set(imx.read(smol_f16.imatrix)) - {"output.weight"}
    for typ in ("Q2_K", "Q3_K_M", "Q4_K_M"):
        ppl = {"quantfarm": with_our_matrix(typ).kld["perplexity"]}       # shared with the preset types
        for kind, mat in (("none", None), ("llama", theirs)):
            q = smol_f16.dir / f"{typ}-{kind}.gguf"
            llama_cpp.quantize(tools, smol_f16.f16, q, typ, mat)
            ppl[kind] = llama_cpp.perplexity(tools, q, smol_f16.text, 512, CHUNKS)["perplexity"]
            q.unlink()
        print(typ, ppl)
        assert ppl["quantfarm"] <= 1.005 * ppl["llama"] and ppl["quantfarm"] < 0.99 * ppl["none"], (typ, ppl)


@pytest.mark.slow
def test_shards_load_in_llama_cpp(tools, smol_f16):
    q = smol_f16.dir / "shard" / "m-Q8_0.gguf"
    q.parent.mkdir()
    llama_cpp.quantize(tools, smol_f16.f16, q, "Q8_0", None)
    parts = llama_cpp.split(tools, q, "40M")
    assert len(parts) == 4 and not q.exists() and parts[0].name == "m-Q8_0-00001-of-00004.gguf"
    assert all(p.stat().st_size <= 40e6 + 2e6 for p in parts)
    assert len(llama_cpp.generate(tools, parts[0], PROMPT, 4).strip()) > 0


@pytest.fixture(scope="module")
def sp_tokenizer(tmp_path_factory):
    """A 1000-piece SentencePiece model (with byte pieces) trained here on WikiText-2 (the converter takes SentencePiece
    vocabularies for every family; a BPE one it must recognize by hash, which offline models lack)."""
    import sentencepiece as spm
    from conftest import require_shared_data
    d = tmp_path_factory.mktemp("sp")
    text = require_shared_data("wikitext2/wiki.valid.tokens").read_text()[:400_000]
    (d / "train.txt").write_text(text)
    spm.SentencePieceTrainer.train(input=str(d / "train.txt"), model_prefix=str(d / "tokenizer"), vocab_size=1000,
                                   model_type="bpe", bos_id=1, eos_id=2, unk_id=0, pad_id=-1, byte_fallback=True,
                                   minloglevel=2, num_threads=1)
    (d / "eval.txt").write_text(text[-20_000:])
    return d


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mixtral"])
def test_tiny_families_convert_and_take_our_imatrix(tools, sp_tokenizer, tmp_path, arch):
    """Tiny Llama, Qwen2 and Mixtral (MoE): converted by llama.cpp's converter, quantized with our importance
    matrix (each expert's from its routed tokens, stacked as llama.cpp stacks the experts), run by llama.cpp."""
    import shutil
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM

    from quantizers.imatrix import make_file as make_imatrix
    cfg = tiny.tiny_moe_config(arch) if arch in tiny.MOE_ARCHS else tiny.tiny_config(arch)
    cfg.vocab_size, cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = 1000, 1, 2, None
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    folder = tmp_path / "m"
    model.save_pretrained(folder)
    shutil.copyfile(sp_tokenizer / "tokenizer.model", folder / "tokenizer.model")
    f16 = tmp_path / "f16.gguf"
    llama_cpp.convert(tools, folder, f16, "tiny")
    moe.unfuse_experts(model)
    calib = SimpleNamespace(tokens=tiny.calib(8, 64, vocab=1000), source="random", content_hash="t")
    mat = make_imatrix("quantfarm", model, calib, f16, None, tools, "cpu", tmp_path / "imatrix.gguf")
    means = imx.read(mat)
    assert {f"blk.{i}.attn_q.weight" for i in range(2)} <= set(means)
    if arch in tiny.MOE_ARCHS:
        assert means["blk.0.ffn_gate_exps.weight"].shape == (tiny.EXPERTS, tiny.HIDDEN)
    q = tmp_path / "q.gguf"
    out = subprocess.run([tools.bin("llama-quantize"), "--imatrix", str(mat), str(f16), str(q), "Q4_0", "2"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"loaded {len(means)} importance matrix entries" in out.stdout + out.stderr
    assert "Q4_0" in set(gguf_types(q).values())
    assert llama_cpp.perplexity(tools, q, sp_tokenizer / "eval.txt", 64, 2)["perplexity"] > 1


# ---- the job, the release, the card, inspect, publishing

@pytest.mark.slow
def test_gguf_release_job_card_inspect_publish(tools, tmp_path):
    """`quantfarm release` of two GGUF sizes: one F16 conversion and one importance matrix for both, each
    artifact with llama.cpp's perplexity and KLD in its report and card, read by `inspect`, the card's
    transformers snippet loading the file, and publishing that carries the GGUF files and the matrix."""
    variants = tmp_path / "v.yaml"
    variants.write_text("- {format: gguf, gguf_type: Q4_K_M}\n- {format: gguf, gguf_type: Q8_0}\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "QUANTFARM_LLAMA_CPP": str(tools.root)}
    run = subprocess.run([sys.executable, "-m", "service.cli", "release", "smollm2-135m", "--variants", str(variants),
                          "--samples", "8", "--seq-len", "256", "--eval-windows", "4", "--out", str(tmp_path / "rel")],
                         capture_output=True, text=True, env=env, cwd=REPO, timeout=1200)
    assert run.returncode == 0, run.stderr[-3000:]
    rel = json.loads((tmp_path / "rel" / "release.json").read_text())
    assert rel["state"] == "succeeded" and [v["variant"] for v in rel["variants"]] == ["gguf-q4_k_m", "gguf-q8_0"]
    assert rel["shared"]["gguf_f16"] == 1 and rel["shared"]["gguf_imatrix"] == 1
    folder = tmp_path / "rel" / "gguf-q4_k_m"
    rep = json.loads((folder / "report.json").read_text())
    lc = rep["llama_cpp"]
    assert lc["quantized"]["perplexity"] > lc["fp16"]["perplexity"] > 1 and 0 < lc["quantized"]["kld"] < 0.5
    assert rep["settings"]["fallbacks"]["attn_q: q4_K -> q5_0"] == 30          # 576-wide: what preflight said
    assert any("576 wide" in w for w in rep["warnings"])
    card = (folder / "README.md").read_text()
    assert "## llama.cpp perplexity and KL divergence" in card and "library_name: gguf" in card
    assert "smollm2-135m-Q4_K_M.gguf" in card and (folder / "imatrix.gguf").is_file()
    import shlex                                                         # the card's llama.cpp command, run
    command = shlex.split(next(ln for ln in card.splitlines() if ln.startswith("llama-completion ")))
    ran = subprocess.run([tools.bin(command[0]), *command[1:], "-t", llama_cpp.threads()], cwd=folder.parent,
                         capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert ran.returncode == 0 and ran.stdout.startswith(PROMPT) and len(ran.stdout) > len(PROMPT) + 2, ran.stderr[-2000:]
    shown = subprocess.run([sys.executable, "-m", "service.cli", "inspect", str(folder)], capture_output=True,
                           text=True, env=env, cwd=REPO)
    assert shown.returncode == 0 and "Q4_K" in shown.stdout and "Q5_0" in shown.stdout, shown.stderr
    from transformers import AutoModelForCausalLM, AutoTokenizer        # the card's snippet
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file="smollm2-135m-Q4_K_M.gguf")
    ids = tok(PROMPT, return_tensors="pt")
    assert model.generate(**ids, max_new_tokens=4, do_sample=False).shape[1] == ids["input_ids"].shape[1] + 4
    pub = subprocess.run([sys.executable, "-m", "service.cli", "publish", str(folder), "--to",
                          f"file://{tmp_path / 'pub'}"], capture_output=True, text=True, env=env, cwd=REPO)
    assert pub.returncode == 0, pub.stderr
    published = {p.name for p in (tmp_path / "pub").rglob("*") if p.is_file()}
    assert {"smollm2-135m-Q4_K_M.gguf", "imatrix.gguf", "README.md", "report.json"} <= published


def test_farm_admission_checks_gguf_before_queueing(tools, tmp_path, monkeypatch):
    """A farm refuses, at submission, a GGUF job its converter cannot take or its machine cannot build, and
    sizes the artifact for the worst type (Q8_0)."""
    from core.errors import NotImplementedFeature
    from service.farm import admission
    from service.farm.policy import Policy
    from service.job.spec import JobSpec
    ok = tiny.save_tiny(tmp_path / "llama", "llama")
    spec = JobSpec(model=str(ok), format="gguf", gguf_type="Q2_K")
    policy = Policy(model_roots=(tmp_path,))
    admitted = admission.admit(spec, admin=False, policy=policy, artifact_root=tmp_path / "art", worker_memory_gb=None)
    assert admitted.revision
    facts = admission.model_facts(admitted.source)
    n = sum(p.numel() for p in facts.meta_model.parameters())
    assert fmt.GGUF().estimate_bytes(facts.meta_model, spec.weight_scheme()) == fmt.max_file_bytes(n) >= n
    import shutil
    odd = Path(shutil.copytree(ok, tmp_path / "odd"))
    cfg = json.loads((odd / "config.json").read_text())
    (odd / "config.json").write_text(json.dumps({**cfg, "architectures": ["NoSuchForCausalLM"]}))
    with pytest.raises(SpecError, match="converter cannot convert NoSuchForCausalLM"):
        admission.admit(JobSpec(model=str(odd), format="gguf"), admin=False, policy=policy,
                        artifact_root=tmp_path / "art", worker_memory_gb=None)
    monkeypatch.setenv("QUANTFARM_LLAMA_CPP", str(tmp_path / "nothing"))
    with pytest.raises(NotImplementedFeature, match="make llama-tools"):
        admission.admit(spec, admin=False, policy=policy, artifact_root=tmp_path / "art", worker_memory_gb=None)
