"""Perplexity, KLD and the fp16 baseline cache on tiny models, checked against direct computation."""
import math

import pytest
import torch

from evaluation import text_metrics
from evaluation.suite import BaselineCache, Evaluation, EvaluationPlan, parts
from core.errors import EvaluationError
from service.job.pipeline import quality_failure
from tests.tiny import VOCAB, tiny_model


def pair():
    """Two different tiny llamas sharing one output head (as an fp16 model and its quantized artifact do)."""
    a, b = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    b.lm_head.weight.data.copy_(a.lm_head.weight.data)
    return a, b


def tokens(n=200, seed=0):
    return torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))


def test_a_model_whose_logits_are_not_its_head_on_the_hidden_state_is_refused():
    """Perplexity and KLD apply the output head to stored hidden states: a model that changes its logits after
    the head (here a logit scale, as some architectures have) would be scored wrongly, so the pass refuses it.
    The check compares the first positions of the first window only."""
    m = tiny_model("llama")
    forward = m.forward

    def scaled(*a, **kw):
        out = forward(*a, **kw)
        out.logits = out.logits * 1.5
        return out
    m.forward = scaled
    with pytest.raises(EvaluationError, match="not its output head applied"):
        text_metrics.text_pass(m, tokens(4 * 64), 64)
    m.forward = forward
    assert text_metrics.text_pass(m, tokens(4 * 64), 64).count == 4 * 63


def test_perplexity_kld_and_top1_match_direct_computation():
    a, b = pair()
    x = tokens(4 * 32)
    base = text_metrics.text_pass(a, x, 32, keep_hidden=True, batch_size=3)
    got = text_metrics.text_pass(b, x, 32, reference=base.hidden, batch_size=3)
    with torch.no_grad():
        la = torch.log_softmax(a(input_ids=x.view(4, 32)).logits[:, :-1].double(), -1)
        lb = torch.log_softmax(b(input_ids=x.view(4, 32)).logits[:, :-1].double(), -1)
    target = x.view(4, 32)[:, 1:]
    assert base.count == got.count == 4 * 31
    assert base.perplexity == pytest.approx(math.exp(-la.gather(-1, target[..., None]).mean().item()), rel=1e-5)
    assert got.perplexity == pytest.approx(math.exp(-lb.gather(-1, target[..., None]).mean().item()), rel=1e-5)
    kld = (la.exp() * (la - lb)).sum(-1).reshape(-1)
    assert torch.allclose(got.kld.double(), kld, atol=1e-5)
    assert got.top1 == (la.argmax(-1) == lb.argmax(-1)).sum().item()
    s = text_metrics.kld_summary(got.kld, got.top1)
    assert s["mean"] == pytest.approx(kld.mean().item(), rel=1e-4)
    assert s["max"] == pytest.approx(kld.max().item(), rel=1e-4)
    assert s["median"] == pytest.approx(kld.median().item(), rel=1e-4)
    assert s["p99"] == pytest.approx(torch.quantile(kld, 0.99).item(), rel=1e-4)
    assert sum(s["histogram"]["counts"]) == got.count
    same = text_metrics.text_pass(a, x, 32, reference=base.hidden)
    assert same.kld.abs().max() < 1e-5 and same.top1 == same.count


def test_strided_windows_score_each_token_once():
    a, _ = pair()
    x = tokens(64)
    p = text_metrics.text_pass(a, x, 32, stride=16)
    nll = 0.0
    with torch.no_grad():    # windows at 0, 16, 32: the first scores tokens 1..31, the others their last 16
        for start, first in ((0, 1), (16, 32), (32, 48)):
            lp = torch.log_softmax(a(input_ids=x[start:start + 32][None]).logits[0, :-1].double(), -1)
            nll -= lp[first - start - 1:].gather(-1, x[first:start + 32, None]).sum().item()
    assert p.count == 63
    assert p.perplexity == pytest.approx(math.exp(nll / 63), rel=1e-5)
    with pytest.raises(EvaluationError, match="need at least 32 tokens"):
        text_metrics.text_pass(a, x[:20], 32)


def plan(ev, x):
    return EvaluationPlan(ev, "tiny-llama", "rev1", torch.float32, torch.device("cpu"), text_tokens=lambda: (x, "random tokens"))


def test_baseline_is_cached_per_part_and_reused(tmp_path):
    a, b = pair()
    x = tokens(6 * 32)
    loads = []

    def load_fp16():
        loads.append(1)
        return a, None

    ev = Evaluation(suite="quick", window_len=32, windows=6)
    cache = BaselineCache(tmp_path)
    first = plan(ev, x).run(cache, load_fp16, lambda: (b, None))
    assert loads == [1] and first["baseline_cache"] == {"text": "miss"}
    assert [r["name"] for r in first["rows"]] == ["perplexity"]
    row = first["rows"][0]
    assert row["recovery"] == pytest.approx(row["fp16"] / row["quantized"])
    assert first["recovery"] == row["recovery"] and first["kld"]["tokens"] == 6 * 31
    assert len(list(tmp_path.glob("*.hidden.safetensors"))) == 1
    second = plan(ev, x).run(cache, load_fp16, lambda: (b, None))
    assert loads == [1] and second["baseline_cache"] == {"text": "hit"}
    assert second["rows"] == first["rows"] and second["kld"] == first["kld"]
    # another limit is another baseline
    third = plan(Evaluation(suite="quick", window_len=32, windows=6, limit=2), x).run(cache, load_fp16,
                                                                                    lambda: (b, None))
    assert loads == [1, 1] and third["rows"][0]["n"] == 2 * 31


def test_kld_refuses_a_different_output_head(tmp_path):
    a, b = pair()
    c = tiny_model("llama", seed=2)
    x = tokens(2 * 32)
    p = plan(Evaluation(suite="quick", window_len=32, windows=2), x)
    with pytest.raises(EvaluationError, match="output head differs"):
        p.run(BaselineCache(tmp_path), lambda: (a, None), lambda: (c, None))
    # perplexity alone does not need the head
    p = plan(Evaluation(suite="perplexity", window_len=32, windows=2), x)
    assert p.run(BaselineCache(tmp_path), lambda: (a, None), lambda: (c, None))["kld"] is None


def test_suites_and_parts():
    assert parts("quick") == ["perplexity", "kld"]
    assert parts("leaderboard") == ["arc_challenge", "hellaswag", "mmlu", "truthfulqa_mc2", "winogrande", "gsm8k"]
    assert parts(["gsm8k", "quick", "mmlu"]) == ["perplexity", "kld", "mmlu", "gsm8k"]
    assert parts("none") == []
    with pytest.raises(ValueError, match="unknown suite or part 'hellaswag2'"):
        Evaluation(suite=["hellaswag2"])


def test_quality_gate():
    ev = {"recovery": 0.97, "recovery_basis": "average of the task scores, quantized / fp16"}
    assert quality_failure(None, ev) is None
    assert quality_failure(0.95, ev) is None
    assert "recovery 0.9700 (average of the task scores" in quality_failure(0.99, ev)
    assert "gives no recovery" in quality_failure(0.9, {"recovery": None})


def word_tokenizer():
    """A tokenizer over the tiny models' vocabulary ("t0" .. "t255"): HFLM needs one to be built."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    tk = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t0"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="t0", eos_token="t1", pad_token="t2")


def test_prefix_sharing_lm_scores_as_hflm():
    """Shared contexts (one- and many-token choices), a context of its own, one over max_length and a
    greedy continuation: the prefix-sharing adapter gives HFLM's log-likelihoods and greedy flags."""
    from lm_eval.models.huggingface import HFLM

    from evaluation.prefix_lm import PrefixSharingLM
    model, tok = tiny_model("llama"), word_tokenizer()
    ids = lambda n, seed: tokens(n, seed).tolist()       # noqa: E731
    shared, other = ids(20, 1), ids(9, 2)
    with torch.no_grad():                                 # the model's own greedy 3-token continuation
        greedy = model.generate(torch.tensor([shared]), max_new_tokens=3, do_sample=False)[0, 20:].tolist()
    reqs = [(("", ""), shared, c) for c in (ids(1, 3), ids(3, 4), greedy, ids(5, 5), greedy[:1])]
    reqs += [(("", ""), other, ids(2, 6)), (("", ""), other, ids(4, 7)), (("", ""), ids(7, 8), ids(4, 9)),
             (("", ""), ids(300, 10), ids(2, 11))]
    want = HFLM(pretrained=model, tokenizer=tok, batch_size=3, max_length=128)._loglikelihood_tokens(reqs)
    got = PrefixSharingLM(pretrained=model, tokenizer=tok, batch_size=3, max_length=128)._loglikelihood_tokens(reqs)
    assert [g for _, g in got] == [g for _, g in want]
    assert want[2][1] and want[4][1] and not want[1][1]
    assert [ll for ll, _ in got] == pytest.approx([ll for ll, _ in want], abs=1e-4)
