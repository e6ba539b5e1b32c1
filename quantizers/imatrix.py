"""Importance matrices for llama-quantize, from quantfarm's calibration forward.

llama.cpp's importance of input column j of a weight is the mean of x_j^2 over the tokens that reach it
(the diagonal of GPTQ's Hessian, up to a factor), kept as per-weight sums and token counts. We collect
them with a hook on every Linear while the fp16 model runs the calibration set (an MoE expert counts only
the tokens routed to it), and write them in llama.cpp's GGUF imatrix layout (tools/imatrix): per tensor
`<name>.in_sum2` F32 [n_mat, n_in] and `<name>.counts` F32 [n_mat, 1], n_mat = experts (1 for a dense
weight), with `general.type = imatrix` and the dataset, chunk count and chunk size keys."""
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from core.paths import atomic_file

from . import llama_cpp
from .formats.gguf import expert_index, name_map


@dataclass
class Stat:
    sum_sq: torch.Tensor            # float64 [in]
    count: int = 0                  # tokens seen


@torch.no_grad()
def collect(model, tokens: torch.Tensor, device="cpu", batch: int = 4) -> dict[str, Stat]:
    """{Linear name: Stat} over the calibration rows `tokens` [n, L], every Linear of the model; the output
    head's from the decoder's final hidden states (its input), without computing the logits."""
    stats: dict[str, Stat] = {}

    def hook(name):
        def f(_mod, inp):
            x = inp[0].detach().reshape(-1, inp[0].shape[-1])
            if x.shape[0] == 0:
                return
            s = stats.get(name) or stats.setdefault(name, Stat(torch.zeros(x.shape[1], dtype=torch.float64)))
            s.sum_sq += torch.linalg.vector_norm(x.float(), dim=0).square().cpu()     # per batch in fp32, summed in fp64
            s.count += x.shape[0]
        return f

    head = model.get_output_embeddings()
    head_name = next((n for n, m in model.named_modules() if m is head), None)
    trunk = model.get_decoder() if head_name else None        # the head's input is the trunk's output: no logits
    handles = [m.register_forward_pre_hook(hook(n)) for n, m in model.named_modules()
               if isinstance(m, nn.Linear) and (m is not head or trunk is None)]
    was = next(model.parameters()).device
    try:
        model.to(device)
        for i in range(0, tokens.shape[0], batch):
            ids = tokens[i:i + batch].to(device)
            if trunk is None:
                model(ids, use_cache=False)
            else:
                hook(head_name)(head, (trunk(input_ids=ids, use_cache=False).last_hidden_state,))
    finally:
        for h in handles:
            h.remove()
        model.to(was)
    return stats


def entries(stats: dict[str, Stat], to_gguf) -> dict[str, tuple]:
    """{GGUF weight name: (sums [n_mat, in], counts [n_mat])}: experts stacked by index, names the
    converter's. Linears without a GGUF weight (none in supported families) are left out."""
    grouped: dict[str, dict[int, Stat]] = defaultdict(dict)
    for name, s in stats.items():
        g = to_gguf(name)
        if g is not None:
            grouped[g + ".weight"][expert_index(name) or 0] = s
    out = {}
    for g, by_expert in grouped.items():
        n = max(by_expert) + 1
        width = next(iter(by_expert.values())).sum_sq.numel()
        sums, counts = np.zeros((n, width), np.float32), np.zeros(n, np.float32)
        for e, s in by_expert.items():
            sums[e], counts[e] = s.sum_sq.numpy(), s.count
        out[g] = (sums, counts)
    return out


def write(path, table: dict[str, tuple], dataset: str, chunk_count: int, chunk_size: int) -> None:
    import gguf
    w = gguf.GGUFWriter(str(path), arch="imatrix")
    # GGUFWriter always writes general.architecture; the imatrix loader reads only these keys
    w.add_string("general.type", "imatrix")
    w.add_array("imatrix.datasets", [dataset])
    w.add_uint32("imatrix.chunk_count", chunk_count)
    w.add_uint32("imatrix.chunk_size", chunk_size)
    for name, (sums, counts) in sorted(table.items()):
        w.add_tensor(f"{name}.in_sum2", sums.astype(np.float32))
        w.add_tensor(f"{name}.counts", counts.astype(np.float32).reshape(-1, 1))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def read(path) -> dict[str, np.ndarray]:
    """{GGUF weight name: mean x^2 per column [n_mat, in]}: what llama-quantize uses, from either maker."""
    import gguf
    r = gguf.GGUFReader(str(path))
    t = {x.name: np.array(x.data) for x in r.tensors}
    out = {}
    for name, sums in t.items():
        if name.endswith(".in_sum2"):
            base = name[:-len(".in_sum2")]
            counts = t[base + ".counts"].reshape(-1, 1)
            out[base] = sums.reshape(counts.shape[0], -1) / np.maximum(counts, 1)
    return out


def make_file(kind: str, model, calib, f16: Path, tokenizer, t: llama_cpp.Tools, dev, out: Path) -> Path:
    """The importance matrix file `out`: ours from the calibration forward, or llama-imatrix's on the same
    text (the calibration rows decoded). Kept when it exists: name it by what it depends on."""
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    n, seq = calib.tokens.shape
    with atomic_file(out) as tmp:
        if kind == "quantfarm":
            import gguf
            r = gguf.GGUFReader(str(f16))
            arch = str(r.fields["general.architecture"].contents())
            blocks = int(r.fields[f"{arch}.block_count"].contents())
            stats = collect(model, calib.tokens, dev)
            table = entries(stats, name_map(arch, blocks))
            have = {x.name for x in r.tensors}
            table = {k: v for k, v in table.items() if k in have}      # a tied head is token_embd: not a matmul weight here
            write(tmp, table, calib.source, n, seq)
        else:
            text = tmp.with_suffix(".txt")
            text.write_text("\n\n".join(tokenizer.decode(row, skip_special_tokens=True) for row in calib.tokens))
            try:
                llama_cpp.imatrix(t, f16, text, tmp, ctx=seq, chunks=n)
            finally:
                text.unlink(missing_ok=True)
    return out
