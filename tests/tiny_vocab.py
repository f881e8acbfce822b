"""A tiny but real GPT-2 style byte-level BPE tokenizer, written into GGUF test models.

Layout (ids are stable; tests rely on them):
  0 `<|endoftext|>`, 1 `<|im_start|>`, 2 `<|im_end|>`  CONTROL tokens (like SmolLM2's ids 0-2)
  3 .. 258                                              the 256 byte-level symbols, in byte order
  259 ..                                                one token per merge, in merge (rank) order
The merges make a few whole words single tokens ("Ġthe", "Hello", "user", "assistant", ...), and two
of them stop half-way through a multi-byte character ("ä½" is 2 of the 3 bytes of 你, "ðŁ" 2 of the 4
bytes of an emoji), so streaming detokenizer tests meet tokens that end mid-character.
`add_tiny_spm_tokenizer` writes a tiny SentencePiece ("llama") vocabulary instead (see SPM_* below).
"""
from __future__ import annotations

import gguf

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
BOS_ID = 0
EOS_ID = 2
NUM_BYTE_SYMBOLS = 256
FIRST_BYTE_ID = len(SPECIAL_TOKENS)
FIRST_MERGE_ID = FIRST_BYTE_ID + NUM_BYTE_SYMBOLS

# ChatML, as Qwen/SmolLM-style models ship it (no default system prompt).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Words that become one token each; their merges are built left to right ("u s", "us e", "use r").
_WORDS = (
    "Ġthe", "Ġand", "Ġof", "Ġis", "Ġto", "Ġin", "ing", "Hello", "Ġworld", "user", "assistant", "system",
    "Ġcapital", "ĠFrance", "ĠParis", "ĠĠĠĠ", "ĊĊ", "def", "Ġreturn", "Ã©",
)
# Stop half-way through a multi-byte character (see module docstring).
_PARTIAL_CHARS = ("ä½", "ðŁ")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (the byte-level BPE alphabet)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def tiny_merges() -> list[str]:
    """The merge list, in rank order, each "left right" as GGUF stores it (no duplicates)."""
    merges: list[str] = []
    for word in _WORDS + _PARTIAL_CHARS:
        for end in range(2, len(word) + 1):
            merge = f"{word[:end - 1]} {word[end - 1]}"
            if merge not in merges:
                merges.append(merge)
    return merges


def tiny_tokens() -> tuple[list[str], list[int]]:
    """(token strings, token types) for the whole tiny vocabulary, in id order."""
    byte_symbols = [bytes_to_unicode()[b] for b in range(NUM_BYTE_SYMBOLS)]
    merged = [m.replace(" ", "") for m in tiny_merges()]
    tokens = list(SPECIAL_TOKENS) + byte_symbols + merged
    assert len(set(tokens)) == len(tokens), "tiny vocab has duplicate tokens"
    types = [gguf.TokenType.CONTROL] * len(SPECIAL_TOKENS) + [gguf.TokenType.NORMAL] * (len(tokens) - FIRST_BYTE_ID)
    return tokens, [int(t) for t in types]


def add_tiny_tokenizer(writer: gguf.GGUFWriter, *, add_bos: bool = False, pre: str = "smollm") -> int:
    """Write the tiny byte-level BPE tokenizer's metadata into `writer`; return its vocabulary size.

    `add_bos` sets `tokenizer.ggml.add_bos_token` (BOS is `<|endoftext|>`, id 0); `pre` is the
    `tokenizer.ggml.pre` kind ("smollm" splits digits one by one, "default" is plain GPT-2).
    """
    tokens, types = tiny_tokens()
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(tiny_merges())
    writer.add_bos_token_id(BOS_ID)
    writer.add_eos_token_id(EOS_ID)
    writer.add_unk_token_id(0)
    writer.add_pad_token_id(EOS_ID)
    writer.add_add_bos_token(add_bos)
    writer.add_add_eos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)
    return len(tokens)


# A tiny SentencePiece ("llama") vocabulary: <unk>, <s>, </s>, the 256 <0xXX> byte pieces, single characters,
# then merged pieces whose scores rank the merges (higher first), as in a SentencePiece BPE model.
# "hello world" -> "▁hello" "▁world"; "Hello" -> "▁" "H" "e" "llo"; "é" -> <0xC3> <0xA9> (byte fallback).
SPM_SPECIALS = (("<unk>", gguf.TokenType.UNKNOWN), ("<s>", gguf.TokenType.CONTROL),
                ("</s>", gguf.TokenType.CONTROL))
SPM_CHARS = "▁abcdefghijklmnopqrstuvwxyzHW,.!?'"
SPM_MERGED = ("▁t", "he", "▁the", "ll", "▁w", "or", "▁wor", "ld", "▁world", "▁h", "▁he", "llo", "▁hello",
              "▁▁", "▁▁▁▁")


def add_tiny_spm_tokenizer(writer: gguf.GGUFWriter, *, add_bos: bool = True) -> int:
    """Write the tiny SentencePiece tokenizer (BOS `<s>`=1, EOS `</s>`=2); return its vocabulary size."""
    tokens = [t for t, _ in SPM_SPECIALS] + [f"<0x{b:02X}>" for b in range(256)]
    types = [int(k) for _, k in SPM_SPECIALS] + [int(gguf.TokenType.BYTE)] * 256
    scores = [0.0] * len(tokens)
    pieces = list(SPM_MERGED) + list(SPM_CHARS)
    tokens += pieces
    types += [int(gguf.TokenType.NORMAL)] * len(pieces)
    scores += [-float(rank) for rank in range(len(SPM_MERGED))]
    scores += [-1000.0 - rank for rank in range(len(SPM_CHARS))]
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(add_bos)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(True)
    return len(tokens)
