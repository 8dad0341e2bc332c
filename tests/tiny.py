"""A tiny random Llama with a real BPE tokenizer and a ChatML template, built in seconds, offline."""

from __future__ import annotations

from pathlib import Path

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = [
    "What is the capital of France? The capital of France is Paris.",
    "How many legs does a spider have? A spider has eight legs.",
    "Write a haiku about the sea. Waves fold into foam, salt wind carries gull voices, the tide keeps its time.",
    "Explain photosynthesis briefly. Plants turn light, water and carbon dioxide into sugar and oxygen.",
    "Name three primary colours: red, yellow and blue. Numbers 0 1 2 3 4 5 6 7 8 9 and symbols ? ! . , : ; - ' \"",
]


GEMMA = (
    "{{ bos_token }}{% for message in messages %}{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' "
    "else message['role']) + '\n' + message['content'] + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)


def _bpe(specials: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(CORPUS * 4, trainer)
    return bpe


def build_tiny_gemma3(folder: Path, *, hidden_size: int = 64, layers: int = 2, seed: int = 0) -> Path:
    """A tiny random Gemma 3 (text): sliding-window and global layers, per-layer-type rope settings
    as transformers 5 nests them, a <bos>-first chat template."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, PreTrainedTokenizerFast

    folder = Path(folder)
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=_bpe(specials, 512), bos_token="<bos>",
                                        eos_token="<end_of_turn>", pad_token="<pad>", unk_token="<unk>")
    tokenizer.chat_template = GEMMA
    config = Gemma3TextConfig(
        **_sizes(tokenizer, hidden_size, layers), head_dim=16, sliding_window=32,
        layer_types=["sliding_attention", "full_attention"][:layers], tie_word_embeddings=True)
    return _save(Gemma3ForCausalLM, config, tokenizer, folder, seed)


def build_tiny_llama(folder: Path, *, hidden_size: int = 64, layers: int = 2, seed: int = 0,
                     vocab_size: int = 512, tied: bool = True) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder = Path(folder)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=_bpe(specials, vocab_size), bos_token="<|im_start|>",
                                        eos_token="<|im_end|>", pad_token="<|im_end|>", unk_token="<|endoftext|>")
    tokenizer.chat_template = CHATML
    config = LlamaConfig(**_sizes(tokenizer, hidden_size, layers), tie_word_embeddings=tied)
    return _save(LlamaForCausalLM, config, tokenizer, folder, seed)


def build_tiny(family: str, folder: Path, *, hidden_size: int = 64, layers: int = 2, seed: int = 0) -> Path:
    """A tiny random model of ``family`` (llama, phi3, qwen2, mistral, gemma3) with a ChatML tokenizer."""
    if family == "gemma3":
        return build_tiny_gemma3(folder, hidden_size=hidden_size, layers=layers, seed=seed)
    if family == "llama":
        return build_tiny_llama(folder, hidden_size=hidden_size, layers=layers, seed=seed)
    import transformers
    from transformers import PreTrainedTokenizerFast

    config_class, model_class, extra = {
        # Phi-4-mini's shape: longrope scaling past an original context (16 = head_dim / 2 factors here), and
        # its published sliding_window, which no layer uses
        "phi3": ("Phi3Config", "Phi3ForCausalLM", {
            "tie_word_embeddings": False, "original_max_position_embeddings": 256, "sliding_window": 262144,
            "rope_parameters": {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * 8,
                                "long_factor": [1.5] * 8}}),
        "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"tie_word_embeddings": True}),
        "mistral": ("MistralConfig", "MistralForCausalLM", {"tie_word_embeddings": False, "sliding_window": None}),
    }[family]
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=_bpe(specials, 512), bos_token="<|im_start|>",
                                        eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    tokenizer.chat_template = CHATML
    config = getattr(transformers, config_class)(**_sizes(tokenizer, hidden_size, layers), **extra)
    return _save(getattr(transformers, model_class), config, tokenizer, Path(folder), seed)


def _sizes(tokenizer, hidden_size: int, layers: int) -> dict:
    """What every tiny model shares: its sizes and the special token ids of its tokenizer."""
    return dict(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=hidden_size * 2,
                num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)


def _save(model_class, config, tokenizer, folder: Path, seed: int) -> Path:
    import torch

    torch.manual_seed(seed)
    model = model_class(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    model.generation_config.save_pretrained(folder)
    return folder
