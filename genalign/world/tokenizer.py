"""A word-level tokenizer covering the world's language, saved as a standard transformers tokenizer.

A BPE vocabulary of 49k tokens would make the world's text encoders (hidden size 32) several MB each for no
gain; every word of the language is one token here, and unknown words map to <|unk|>.
"""

from __future__ import annotations

from .grammar import VOCABULARY

SPECIAL = ["<|pad|>", "<|unk|>", "<|startoftext|>", "<|endoftext|>"]
MAX_LENGTH = 16  # longest prompt (6 words) + start/end, with room to spare


def build_tokenizer(max_length: int = MAX_LENGTH):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL + list(VOCABULARY))}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|unk|>"))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    bos, eos = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
    tk.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>", special_tokens=[("<|startoftext|>", bos), ("<|endoftext|>", eos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|unk|>",
        pad_token="<|pad|>",
        model_max_length=max_length,
    )
