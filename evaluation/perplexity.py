"""Perplexity over fixed windows of a held-out token stream.

Window i is tokens[i*stride : i*stride + window]; in each window the model predicts tokens
1..window-1 from the ones before; perplexity = exp(mean NLL over all predicted tokens). With
stride < window, only the last `stride` tokens of each window after the first are scored, so
every token is scored once with at least window - stride tokens of context.
"""
import math

import torch


@torch.no_grad()
def perplexity(model, tokens: torch.Tensor, window: int = 512, stride: int | None = None,
               max_windows: int | None = 32, batch_size: int = 8, device=None) -> float:
    stride = stride or window
    tokens = tokens.reshape(-1)
    starts = list(range(0, tokens.numel() - window + 1, stride))
    if max_windows:
        starts = starts[:max_windows]
    if not starts:
        raise ValueError(f"need at least {window} tokens for one window, got {tokens.numel()}")
    device = device or next(model.parameters()).device
    nll, count = 0.0, 0
    for b in range(0, len(starts), batch_size):
        batch = torch.stack([tokens[s:s + window] for s in starts[b:b + batch_size]]).to(device)
        logits = model(input_ids=batch, use_cache=False).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        tok_nll = -logp.gather(-1, batch[:, 1:, None]).squeeze(-1)         # [b, window-1]
        for j, s in enumerate(starts[b:b + batch_size]):
            scored = tok_nll[j] if s == 0 or stride == window else tok_nll[j, window - 1 - stride:]
            nll += scored.double().sum().item()
            count += scored.numel()
    return math.exp(nll / count)
