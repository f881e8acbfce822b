"""The model's tokenizer: HF `tokenizers` built from a GGUF vocabulary, plus its jinja2 chat template.

Supported `tokenizer.ggml.model` kinds:
  "gpt2"  byte-level BPE from `tokens` + `merges`; the pre-tokenizer regex is chosen by `tokenizer.ggml.pre`
          (PRE_TOKENIZERS below; an unknown kind falls back to GPT-2's regex with a warning).
  "llama" SentencePiece BPE: merges are rebuilt from `tokens` + `scores` (a merge ranks by the score of the
          piece it makes, as transformers' LlamaConverter does), byte fallback to `<0xXX>` tokens, spaces as
          "▁" with one prepended to every text segment (as llama.cpp and transformers' legacy Llama do).
CONTROL, USER_DEFINED and UNKNOWN tokens are registered as added tokens, so their text in a prompt is that
one token (llama.cpp's and transformers' behaviour). BOS/EOS are added here, per the GGUF flags, not by a
post-processor, so `encode` is the whole story. Chat message *content* is the exception (`encode_chat`):
it is plain text, so a user cannot forge a turn by writing `<|im_start|>system` into a message; only the
special tokens the chat template itself writes are control tokens.
"""
from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import gguf
import jinja2
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from engine.loading.chat_template import ALLOWED_ROLES, CHATML_TEMPLATE, check_messages, compile_template, content_spans

logger = logging.getLogger(__name__)

SUPPORTED_MODELS = ("gpt2", "llama")
# CONTROL tokens that end a turn, stopped on like EOS (llama.cpp's end-of-generation list): models whose
# GGUF has no eot_token_id still stop at the end of their turn.
END_OF_TURN_TEXTS = frozenset(("<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>",
                               "<|endoftext|>", "<EOT>"))
_KEY = "tokenizer.ggml."
_TT = gguf.TokenType

# Pre-tokenizer regexes, as llama.cpp (llama-vocab.cpp) and the models' tokenizer.json files use them.
_LLAMA3_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_RE = _LLAMA3_RE.replace(r"\p{N}{1,3}", r"\p{N}")
# kind -> (split digits one by one first?, regex or None for GPT-2's own, BPE ignore_merges)
PRE_TOKENIZERS: dict[str, tuple[bool, str | None, bool]] = {
    **dict.fromkeys(("default", "gpt2", "gpt-2", "phi-2", "olmo"), (False, None, False)),
    **dict.fromkeys(("smollm", "starcoder", "refact"), (True, None, False)),
    # Llama 3's tokenizer.json sets ignore_merges: a pre-token that is itself in the vocab is one token.
    **dict.fromkeys(("llama-bpe", "llama3", "llama-v3", "falcon3"), (False, _LLAMA3_RE, True)),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen"), (False, _QWEN2_RE, False)),
}


class Tokenizer:
    """Encode/decode text for one model and render its chat template. Build with `from_gguf_metadata`."""

    ALLOWED_ROLES = ALLOWED_ROLES

    def __init__(self, hf: HFTokenizer, tokens: Sequence[str], *, bos_token_id: int | None,
                 eos_token_id: int | None, eos_token_ids: Iterable[int], add_bos: bool, add_eos: bool,
                 chat_template: str | None, source: str = "") -> None:
        self._hf = hf
        self._tokens = list(tokens)
        self.vocab_size = len(self._tokens)
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.eos_token_ids: frozenset[int] = frozenset(eos_token_ids)
        self.add_bos_token = add_bos
        self.add_eos_token = add_eos
        self.chat_template = chat_template
        self.source = source
        self._template: jinja2.Template | None = None
        self._special_ids: dict[str, int] = {}  # special-token text -> id (the first id, as the vocab map does)
        for i, added in sorted(hf.get_added_tokens_decoder().items()):
            if added.special:
                self._special_ids.setdefault(added.content, i)
        # Leftmost-longest, as the tokenizer matches added tokens.
        self._special_re = re.compile("|".join(re.escape(t) for t in sorted(self._special_ids, key=len, reverse=True))
                                      ) if self._special_ids else None
        self._plain: HFTokenizer | None = None  # a copy that reads special-token text as ordinary text

    @classmethod
    def from_gguf_metadata(cls, meta: Mapping[str, Any], source: str = "") -> Tokenizer:
        """Build the tokenizer from `read_metadata` output; `source` (the file) is named in errors."""
        try:
            return cls._from_gguf_metadata(meta, source)
        except ValueError:
            raise
        except Exception as e:  # `tokenizers` raises bare Exceptions (e.g. a merge naming a missing token)
            first = (str(e).strip().splitlines() or [""])[0][:300]
            raise ValueError(f"{source or 'GGUF'}: cannot build the tokenizer from its vocabulary "
                             f"({type(e).__name__}: {first})") from None

    @classmethod
    def _from_gguf_metadata(cls, meta: Mapping[str, Any], source: str) -> Tokenizer:
        kind = meta.get(_KEY + "model")
        if kind not in SUPPORTED_MODELS:
            raise ValueError(f"{source or 'GGUF'}: tokenizer.ggml.model={kind!r} is not supported; "
                             f"supported: {', '.join(SUPPORTED_MODELS)}")
        tokens: list[str] | None = meta.get(_KEY + "tokens")
        if not tokens:
            raise ValueError(f"{source or 'GGUF'} has no tokenizer.ggml.tokens: cannot build its tokenizer")
        types: list[int] = meta.get(_KEY + "token_type") or [int(_TT.NORMAL)] * len(tokens)
        hf = _build_gpt2(meta, tokens, source) if kind == "gpt2" else _build_spm(meta, tokens, types)
        _register_added_tokens(hf, tokens, types)
        bos, eos = meta.get(_KEY + "bos_token_id"), meta.get(_KEY + "eos_token_id")
        # Chat models end a turn with eot/eom tokens (Llama 3: <|eot_id|>, <|eom_id|>): generation stops there too.
        stops = [meta.get(_KEY + k) for k in ("eos_token_id", "eot_token_id", "eom_token_id")]
        stops += [i for i, (t, k) in enumerate(zip(tokens, types)) if k == _TT.CONTROL and t in END_OF_TURN_TEXTS]
        return cls(hf, tokens, bos_token_id=bos, eos_token_id=eos,
                   eos_token_ids=[i for i in stops if i is not None],
                   add_bos=bool(meta.get(_KEY + "add_bos_token", kind == "llama")),
                   add_eos=bool(meta.get(_KEY + "add_eos_token", False)),
                   chat_template=meta.get("tokenizer.chat_template"), source=source)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; special-token text in it is that token. BOS/EOS per the GGUF flags."""
        ids = self._hf.encode(text, add_special_tokens=False).ids
        return self._add_bos_eos(ids) if add_special_tokens else ids

    def _add_bos_eos(self, ids: list[int]) -> list[int]:
        if self.add_bos_token and self.bos_token_id is not None:
            ids.insert(0, self.bos_token_id)
        if self.add_eos_token and self.eos_token_id is not None:
            ids.append(self.eos_token_id)
        return ids

    def encode_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of the rendered chat. Message content is plain text: special-token text inside it is
        tokenized as ordinary characters, never as a control token; the template's own special tokens are.
        Templates that write `{{ bos_token }}` themselves (Llama 2/3, Mistral) would get a second BOS from
        `add_bos_token`; like llama.cpp, keep only one."""
        text = self.apply_chat_template(messages, add_generation_prompt)
        if self._special_re is None or not any(self._special_re.search(m["content"]) for m in messages):
            ids = self._hf.encode(text, add_special_tokens=False).ids  # nothing to keep plain
        else:
            spans = content_spans(lambda msgs: self.apply_chat_template(msgs, add_generation_prompt), messages, text)
            if spans is None:
                raise ValueError(f"{self.source or 'GGUF'}: the chat template changes message content, so "
                                 "special-token text in a message cannot be kept as plain text; remove it")
            ids = self._encode_outside(text, spans)
        ids = self._add_bos_eos(ids)
        if self.add_bos_token and len(ids) > 1 and ids[0] == ids[1] == self.bos_token_id:
            del ids[0]
        return ids

    def _encode_outside(self, text: str, spans: list[tuple[int, int]]) -> list[int]:
        """Token ids of `text` where special-token text is a control token only outside `spans`."""
        if self._plain is None:
            self._plain = HFTokenizer.from_str(self._hf.to_str())
            self._plain.encode_special_tokens = True
        ids, pos = [], 0
        for m in self._special_re.finditer(text):
            if any(m.start() < end and start < m.end() for start, end in spans):
                continue  # written by a user: stays plain text
            ids += self._plain.encode(text[pos:m.start()], add_special_tokens=False).ids
            ids.append(self._special_ids[m.group()])
            pos = m.end()
        return ids + self._plain.encode(text[pos:], add_special_tokens=False).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`; CONTROL tokens are dropped when `skip_special_tokens`."""
        return self._hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        """The GGUF token string of `token_id` (byte-level / "▁" form), or None if out of range."""
        return self._tokens[token_id] if 0 <= token_id < self.vocab_size else None

    def token_to_id(self, token: str) -> int | None:
        """The id of the token string `token` (as stored in the GGUF), or None."""
        return self._hf.token_to_id(token)

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """Render `messages` ({"role", "content"} dicts) with the model's chat template, as transformers does.

        A GGUF without a template whose vocabulary has `<|im_start|>`/`<|im_end|>` gets ChatML (the only
        format those tokens imply), with a warning; any other model without a template is a ValueError.
        """
        check_messages(messages)
        if self._template is None:
            self._template = compile_template(self._template_text())
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         bos_token=self._token_text(self.bos_token_id),
                                         eos_token=self._token_text(self.eos_token_id))
        except jinja2.TemplateError as e:
            raise ValueError(f"{self.source or 'GGUF'}: chat template failed: {e}") from e

    def _template_text(self) -> str:
        if self.chat_template:
            return self.chat_template
        if self.token_to_id("<|im_start|>") is not None and self.token_to_id("<|im_end|>") is not None:
            logger.warning("%s has no tokenizer.chat_template; using ChatML", self.source or "GGUF")
            return CHATML_TEMPLATE
        raise ValueError(f"{self.source or 'GGUF'} has no tokenizer.chat_template (and no ChatML tokens); "
                         "pass a prompt string or token ids instead of messages")

    def _token_text(self, token_id: int | None) -> str:
        return "" if token_id is None else (self.id_to_token(token_id) or "")


def _build_gpt2(meta: Mapping[str, Any], tokens: list[str], source: str) -> HFTokenizer:
    """Byte-level BPE (GPT-2 / Llama 3 / SmolLM2 / Qwen 2 style)."""
    pre = meta.get(_KEY + "pre", "default")
    if pre not in PRE_TOKENIZERS:
        logger.warning("%s: tokenizer.ggml.pre=%r is unknown; using GPT-2's regex (known: %s)",
                       source or "GGUF", pre, ", ".join(sorted(PRE_TOKENIZERS)))
    split_digits, regex, ignore_merges = PRE_TOKENIZERS.get(pre, PRE_TOKENIZERS["default"])
    merges = [_split_merge(m) for m in meta.get(_KEY + "merges", [])]
    hf = HFTokenizer(models.BPE(_vocab(tokens), merges, ignore_merges=ignore_merges))
    steps: list[pre_tokenizers.PreTokenizer] = []
    if split_digits:
        steps.append(pre_tokenizers.Digits(individual_digits=True))
    if regex is not None:
        steps.append(pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False))
    steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=regex is None))
    hf.pre_tokenizer = pre_tokenizers.Sequence(steps)
    hf.decoder = decoders.ByteLevel()
    return hf


def _build_spm(meta: Mapping[str, Any], tokens: list[str], types: list[int]) -> HFTokenizer:
    """SentencePiece BPE (Llama 1/2, Mistral): merges rebuilt from scores, byte fallback, "▁" for spaces."""
    scores: list[float] = meta.get(_KEY + "scores") or [0.0] * len(tokens)
    unk_id = meta.get(_KEY + "unknown_token_id", 0)
    vocab = _vocab(tokens)
    hf = HFTokenizer(models.BPE(vocab, _merges_from_scores(tokens, types, scores, vocab),
                                unk_token=tokens[unk_id], fuse_unk=True, byte_fallback=True))
    steps = [normalizers.Replace(" ", "▁")]
    if meta.get(_KEY + "add_space_prefix", True):
        steps.insert(0, normalizers.Prepend("▁"))
    hf.normalizer = normalizers.Sequence(steps)
    # Strip removes the one prefix space of the first piece, as SentencePiece's decoder does.
    hf.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    return hf


def _merges_from_scores(tokens: list[str], types: list[int], scores: list[float],
                        vocab: Mapping[str, int]) -> list[tuple[str, str]]:
    """BPE merges equivalent to SentencePiece's scored pieces (transformers' SentencePieceExtractor).

    Every split of a NORMAL piece into two vocab pieces is a merge, ranked by the piece's score (higher
    first), ties by the ids of the parts. Control/byte/unused pieces are never produced from text.
    """
    ranked: list[tuple[float, int, int, str, str]] = []
    for piece, kind, score in zip(tokens, types, scores):
        if kind != _TT.NORMAL:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                ranked.append((-score, vocab[left], vocab[right], left, right))
    ranked.sort(key=lambda m: m[:3])
    return [(left, right) for _, _, _, left, right in ranked]


def _vocab(tokens: list[str]) -> dict[str, int]:
    """token -> id; a duplicated token string keeps its first id (as llama.cpp's text_to_token map does)."""
    vocab: dict[str, int] = {}
    for i, tok in enumerate(tokens):
        vocab.setdefault(tok, i)
    if len(vocab) != len(tokens):
        logger.warning("GGUF vocabulary has %d duplicated token strings", len(tokens) - len(vocab))
    return vocab


def _split_merge(merge: str) -> tuple[str, str]:
    # Search from index 1: a merge's left part may itself be a single space (llama.cpp does the same).
    cut = merge.find(" ", 1)
    if cut < 0:
        raise ValueError(f"GGUF merge {merge!r} is not 'left right'")
    return merge[:cut], merge[cut + 1:]


def _register_added_tokens(hf: HFTokenizer, tokens: list[str], types: list[int]) -> None:
    """Match CONTROL/UNKNOWN (special) and USER_DEFINED (plain) token text as whole tokens in input."""
    special = [AddedToken(t, special=True, normalized=False)
               for t, k in zip(tokens, types) if t and k in (_TT.CONTROL, _TT.UNKNOWN)]
    user = [AddedToken(t, special=False, normalized=False)
            for t, k in zip(tokens, types) if t and k == _TT.USER_DEFINED]
    if special:
        hf.add_special_tokens(special)
    if user:
        hf.add_tokens(user)
