"""Perplexity and KL divergence from the fp16 model on the same windows of held-out text.

The baseline pass keeps the final hidden state (after the last norm) at every scored position, not the
logits: the output head is not quantized, so fp16 logits are `head(h)` again at comparison time, exactly,
for 1/(vocab/hidden) of the storage (SmolLM2: 576 floats instead of 49,152 per token).
Window i is tokens[i*stride : i*stride + window]; each window predicts its tokens 1..window-1, and with
stride < window only the last `stride` predictions of later windows are scored, so each token counts once.
"""
import hashlib
import math
from dataclasses import dataclass

import torch

from core.errors import EvaluationError

KLD_BINS = torch.logspace(-6, 1, 29)       # histogram edges for the report's plot (4 per decade)
HEAD_CHECK = 32     # positions of the first window on which the model's own logits are compared with head(h)


def window_starts(n_tokens: int, window: int, stride: int, max_windows: int | None) -> list[int]:
    starts = list(range(0, n_tokens - window + 1, stride))[:max_windows or None]
    if not starts:
        raise EvaluationError(f"need at least {window} tokens for one window, got {n_tokens}")
    return starts


def scored_slice(start: int, window: int, stride: int) -> slice:
    """Positions (into the window's window-1 predictions) that are scored."""
    return slice(0 if start == 0 or stride == window else window - 1 - stride, window - 1)


def output_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    logits = model.get_output_embeddings()(hidden).float()
    cap = getattr(model.config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


def head_hash(model) -> str:
    """Identifies the output head (and its soft-cap): KLD from stored hidden states is exact only if the
    compared model's head is the baseline's."""
    w = model.get_output_embeddings().weight.detach().float().cpu().contiguous()
    cap = getattr(model.config, "final_logit_softcapping", None)
    return hashlib.sha256(w.numpy().tobytes() + repr(cap).encode()).hexdigest()


def _hidden(model, batch):
    return model.base_model(input_ids=batch, use_cache=False).last_hidden_state


@dataclass
class TextPass:
    nll: float                     # summed over scored tokens
    count: int
    hidden: torch.Tensor | None    # [count, d] final hidden states (baseline pass)
    kld: torch.Tensor | None       # [count] per-token KL(fp16 || this model) (comparison pass)
    top1: int = 0                  # positions where both argmaxes agree

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll / self.count)


@torch.no_grad()
def text_pass(model, tokens: torch.Tensor, window: int, stride: int | None = None, max_windows: int | None = None,
              batch_size: int = 8, keep_hidden: bool = False, reference: torch.Tensor | None = None) -> TextPass:
    """One pass over the windows: NLL always; with `keep_hidden` the scored hidden states; with
    `reference` (hidden states of a baseline pass) per-token KLD and top-1 agreement against this model's
    head applied to them (the caller checks with `head_hash` that it is the baseline's head)."""
    stride = stride or window
    tokens = tokens.reshape(-1)
    starts = window_starts(tokens.numel(), window, stride, max_windows)
    device = next(model.parameters()).device
    nll, count, top1, hidden, klds = 0.0, 0, 0, [], []
    for b in range(0, len(starts), batch_size):
        group = starts[b:b + batch_size]
        batch = torch.stack([tokens[s:s + window] for s in group]).to(device)
        h = _hidden(model, batch)
        if b == 0:             # on a prefix: a causal model's first positions do not see the rest
            full = model(input_ids=batch[:1, :HEAD_CHECK], use_cache=False).logits.float()
            mine = output_logits(model, h[:1, :HEAD_CHECK])
            if not torch.allclose(full, mine, rtol=1e-3, atol=1e-3 * full.abs().max().item()):
                raise EvaluationError(f"{type(model).__name__}'s logits are not its output head applied to its last "
                                      "hidden state; perplexity/KLD cannot use this architecture yet")
        for j, s in enumerate(group):
            sl = scored_slice(s, window, stride)
            hj = h[j, sl]
            logp = torch.log_softmax(output_logits(model, hj), -1)
            target = batch[j, 1:][sl]
            nll -= logp.gather(-1, target[:, None]).double().sum().item()
            if keep_hidden:
                hidden.append(hj.cpu())
            if reference is not None:
                ref = reference[count:count + hj.shape[0]].to(device, hj.dtype)
                logp_ref = torch.log_softmax(output_logits(model, ref), -1)
                klds.append((logp_ref.exp() * (logp_ref - logp)).sum(-1).clamp_min(0).cpu())
                top1 += (logp_ref.argmax(-1) == logp.argmax(-1)).sum().item()
            count += hj.shape[0]
    if reference is not None and count != reference.shape[0]:
        raise EvaluationError(f"the baseline holds {reference.shape[0]} scored positions but this pass scored {count}")
    return TextPass(nll, count, torch.cat(hidden) if keep_hidden else None,
                    torch.cat(klds) if reference is not None else None, top1)


def kld_summary(kld: torch.Tensor, top1: int) -> dict:
    k = kld.double()
    counts = torch.histogram(k.clamp(KLD_BINS[0].item(), KLD_BINS[-1].item()).float(), bins=KLD_BINS).hist
    return {"mean": k.mean().item(), "median": k.median().item(), "p99": torch.quantile(k, 0.99).item(),
            "max": k.max().item(), "top1_agreement": top1 / k.numel(), "tokens": k.numel(),
            "histogram": {"edges": KLD_BINS.tolist(), "counts": [int(c) for c in counts.tolist()]}}


def perplexity(model, tokens: torch.Tensor, window: int = 512, stride: int | None = None,
               max_windows: int | None = 32, batch_size: int = 8) -> float:
    return text_pass(model, tokens, window, stride, max_windows, batch_size).perplexity
