"""Tiny random decoder models built from transformers configs, for fast architecture tests.

Every model: 2 layers (override with `layers=`), vocab 256, float32, eval(). Hidden 64, 4 attention heads
of 16 with 2 KV heads (GQA), intermediate 128: every Linear has in and out features that are multiples
of 8, so 2/4/8-bit GPTQ packing can hold them, and 32 divides the hidden size (group size 32 gives
two whole groups on the hidden-size inputs, four on the MLP's down_proj).
"""
import torch

ARCHS = ("llama", "mistral", "qwen2", "phi3", "gemma")

VOCAB = 256
HIDDEN = 64
HEADS = 4
KV_HEADS = 2
HEAD_DIM = HIDDEN // HEADS
INTERMEDIATE = 128


def tiny_config(arch: str, layers: int = 2):
    """The transformers config of a tiny `arch` model (random weights come from `tiny_model`)."""
    import transformers as tf

    common = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=layers,
                  num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=256,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    if arch == "llama":
        return tf.LlamaConfig(**common, head_dim=HEAD_DIM)
    if arch == "mistral":
        return tf.MistralConfig(**common, head_dim=HEAD_DIM, sliding_window=None)
    if arch == "qwen2":            # q/k/v carry biases
        return tf.Qwen2Config(**common, use_sliding_window=False)
    if arch == "phi3":             # fused qkv_proj and gate_up_proj
        return tf.Phi3Config(**common, original_max_position_embeddings=256)
    if arch == "gemma":            # tied lm_head, scaled embeddings, (1 + w) RMSNorm
        return tf.GemmaConfig(**{**common, "tie_word_embeddings": True}, head_dim=HEAD_DIM)
    raise ValueError(f"unknown tiny architecture {arch!r}; one of {ARCHS}")


def tiny_model(arch: str, seed: int = 0, layers: int = 2):
    """A random `arch` causal LM (float32, eval mode), the same for the same seed.

    transformers initialises biases to 0 and norm weights to their identity value, both exact in
    float16; here they get random values too, so a bias that is dropped, or a 16-bit rounding of the
    unquantized tensors, shows in the logits.
    """
    from transformers import AutoModelForCausalLM

    config = tiny_config(arch, layers)
    g = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(".bias"):
                    p.copy_(0.02 * torch.randn_like(p))
                elif "norm" in name:
                    p.add_(0.1 * torch.randn_like(p))
    finally:
        torch.random.set_rng_state(g)
    return model.eval()


def calib(n: int = 8, seq: int = 32, vocab: int = VOCAB, seed: int = 0) -> torch.Tensor:
    """Random calibration tokens [n, seq] (int64), the same for the same seed."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, seq), generator=g)


def save_tiny(folder, arch: str = "llama", seed: int = 0, layers: int = 2):
    """A tiny model saved as a local checkpoint folder (safetensors) with a word-level tokenizer of
    VOCAB words, so the whole pipeline (resolve, tokenize, calibrate, evaluate) runs on it."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(VOCAB - 4)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                            pad_token="<pad>").save_pretrained(folder)
    tiny_model(arch, seed=seed, layers=layers).save_pretrained(folder)
    return folder


MOE_ARCHS = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")
EXPERTS, TOP_K = 4, 2


def tiny_moe_config(arch: str, layers: int = 2):
    """A tiny mixture-of-experts config: 4 experts, 2 routed per token (Qwen2-MoE adds a shared expert)."""
    import transformers as tf

    common = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=layers,
                  num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=256,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
                  num_experts_per_tok=TOP_K)
    if arch == "mixtral":
        return tf.MixtralConfig(**common, num_local_experts=EXPERTS, head_dim=HEAD_DIM)
    if arch == "qwen2_moe":
        return tf.Qwen2MoeConfig(**common, num_experts=EXPERTS, moe_intermediate_size=64,
                                 shared_expert_intermediate_size=INTERMEDIATE)
    if arch == "qwen3_moe":
        return tf.Qwen3MoeConfig(**common, num_experts=EXPERTS, moe_intermediate_size=64, head_dim=HEAD_DIM)
    if arch == "olmoe":
        return tf.OlmoeConfig(**common, num_experts=EXPERTS)
    raise ValueError(f"unknown tiny MoE architecture {arch!r}; one of {MOE_ARCHS}")


def tiny_moe(arch: str, seed: int = 0, layers: int = 2):
    """A random tiny MoE causal LM (float32, eval), weights at the scale of a trained model's."""
    from transformers import AutoModelForCausalLM

    g = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(tiny_moe_config(arch, layers), dtype=torch.float32)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.add_(0.1 * torch.randn_like(p))
                else:
                    p.normal_(0, 0.05)
    finally:
        torch.random.set_rng_state(g)
    return model.eval()
