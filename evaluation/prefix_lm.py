"""lm-eval's Hugging Face adapter, with log-likelihoods computed once per shared context.

Multiple-choice tasks score every choice after the same few-shot context (25-shot ARC: ~2,000 tokens of
context, 4 choices of a few tokens). HFLM runs each (context + choice) in full; here the context runs
once, its KV cache is repeated for the choices, and only the choice tokens run again; a context that
no other request shares goes through HFLM's batched path as it is. Tokenization,
truncation rules and generation are HFLM's own, so the requests and scores are those of lm-eval.
"""
import copy
from collections import defaultdict

import torch
from lm_eval.models.huggingface import HFLM


class PrefixSharingLM(HFLM):
    @torch.no_grad()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
        out = [None] * len(requests)
        groups, plain = defaultdict(list), []
        for i, (_, ctx, cont) in enumerate(requests):
            if len(ctx) + len(cont) > self.max_length or not ctx or not cont:
                plain.append(i)                    # HFLM's own left-truncation path
            else:
                groups[tuple(ctx)].append(i)
        plain += [m[0] for m in groups.values() if len(m) == 1]   # nothing shared (Winogrande: a context per
        if plain:                                                  # choice): HFLM batches these, which is faster
            for i, r in zip(plain, super()._loglikelihood_tokens([requests[i] for i in plain], True, override_bs)):
                out[i] = r
        for ctx, members in groups.items():
            if len(members) > 1:
                for i, r in zip(members, self._score_choices(list(ctx), [requests[i][2] for i in members])):
                    out[i] = r
        return out

    def _score_choices(self, ctx: list[int], conts: list[list[int]]) -> list[tuple[float, bool]]:
        dev = self.model.device
        first = self.model(input_ids=torch.tensor([ctx], device=dev), use_cache=True)
        last = torch.log_softmax(first.logits[0, -1].float(), -1)         # predicts each choice's first token
        results = [None] * len(conts)
        multi = [j for j, c in enumerate(conts) if len(c) > 1]
        for j, c in enumerate(conts):
            if len(c) == 1:
                results[j] = (last[c[0]].item(), bool(last.argmax() == c[0]))
        for b in range(0, len(multi), self.batch_size):
            idx = multi[b:b + self.batch_size]
            width = max(len(conts[j]) for j in idx) - 1
            # right padding: padded positions come after every scored one, so causality keeps them inert
            inp = torch.tensor([conts[j][:-1] + [conts[j][-1]] * (width - len(conts[j]) + 1) for j in idx], device=dev)
            cache = copy.deepcopy(first.past_key_values)
            cache.batch_repeat_interleave(len(idx))
            pos = torch.arange(len(ctx), len(ctx) + width, device=dev).expand(len(idx), -1)
            logp = torch.log_softmax(self.model(input_ids=inp, past_key_values=cache, position_ids=pos,
                                                use_cache=True).logits.float(), -1)
            for row, j in enumerate(idx):
                c = torch.tensor(conts[j], device=dev)
                lp = torch.cat([last[None], logp[row, :len(c) - 1]])             # [len(c), vocab]
                results[j] = (lp.gather(-1, c[:, None]).sum().item(), bool((lp.argmax(-1) == c).all()))
        return results
