"""CLIP's byte-level BPE tokenizer, read from a transformers ``tokenizer/`` folder without transformers.

Stable Diffusion pipelines tokenize with ``padding="max_length", truncation=True, max_length=77``: BOS, at
most 75 tokens, EOS, then the pad token (``<|endoftext|>`` in SD 1.x, ``!`` in SD 2.x, read from the folder).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE

from persguard_jax.models.convert import WeightsError, read_json

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# CLIP's word split: special tokens, English contractions, letter runs, single digits, other symbol runs.
CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def _token_str(tok) -> str | None:
    return tok.get("content") if isinstance(tok, dict) else tok


def build_clip_bpe(vocab: dict[str, int], merges: list[tuple[str, str]]) -> Tokenizer:
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, continuing_subword_prefix="", end_of_word_suffix="</w>",
                        fuse_unk=False, unk_token=EOS))
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    tok.decoder = decoders.ByteLevel()
    return tok


def train_clip_bpe(texts: Sequence[str], vocab_size: int = 1000) -> Tokenizer:
    """A CLIP-style BPE trained on ``texts`` (for the synthetic world: same files, same loading path as SD)."""
    from tokenizers.trainers import BpeTrainer
    tok = build_clip_bpe({BOS: 0, EOS: 1}, [])
    trainer = BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS, EOS], end_of_word_suffix="</w>",
                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(texts), trainer)
    # As in CLIP's own vocabulary, every byte also exists as a word-final token ("a</w>"), so no text ever
    # maps to the unknown token (the trainer only adds the word-final forms it saw).
    # Ids are reassigned in CLIP's own order (specials, bytes, word-final bytes, then one token per merge): the
    # trainer numbers its alphabet in hash-map order, which differs between processes, and the same corpus must
    # give the same ids everywhere (a model trained in one process is sampled in another).
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    ordered = [BOS, EOS, *alphabet, *(ch + "</w>" for ch in alphabet), *(a + b for a, b in merges),
               *sorted(model["vocab"])]
    vocab: dict[str, int] = {}
    for token in ordered:
        vocab.setdefault(token, len(vocab))
    return build_clip_bpe(vocab, merges)


def read_merges(path: Path) -> list[tuple[str, str]]:
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    merges = []
    for i, line in enumerate(lines):
        if not line.strip() or (i == 0 and line.startswith("#version")):
            continue
        parts = line.split()
        if len(parts) != 2:
            raise WeightsError(f"{path}: line {i + 1} is not a merge pair: {line!r}")
        merges.append((parts[0], parts[1]))
    return merges


class CLIPTokenizer:
    """Text -> fixed-length int32 ids, as ``transformers.CLIPTokenizer`` with SD's padding and truncation."""

    def __init__(self, bpe: Tokenizer, *, model_max_length: int = 77, pad_token: str = EOS):
        self.bpe = bpe
        self.model_max_length = model_max_length
        self.bos_id, self.eos_id = self._id(BOS), self._id(EOS)
        self.pad_token = pad_token
        self.pad_id = self._id(pad_token)
        if pad_token not in (BOS, EOS):
            # transformers registers the pad token as a special token, so SD 2.x's "!" pad also splits "!"
            # out of prompts as that token; match it, since the text encoder was trained on those ids.
            bpe.add_special_tokens([pad_token])

    def _id(self, token: str) -> int:
        i = self.bpe.token_to_id(token)
        if i is None:
            raise WeightsError(f"tokenizer: special token {token!r} is not in the vocabulary")
        return i

    @property
    def vocab_size(self) -> int:
        return self.bpe.get_vocab_size()

    @classmethod
    def from_folder(cls, folder: str | Path) -> "CLIPTokenizer":
        folder = Path(folder)
        if not folder.is_dir():
            raise WeightsError(f"{folder}: tokenizer folder not found")
        cfg = read_json(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").is_file() else {}
        special = read_json(folder / "special_tokens_map.json") if (folder / "special_tokens_map.json").is_file() else {}
        vocab_path, merges_path = folder / "vocab.json", folder / "merges.txt"
        if vocab_path.is_file() and merges_path.is_file():
            bpe = build_clip_bpe(read_json(vocab_path), read_merges(merges_path))
        elif (folder / "tokenizer.json").is_file():
            bpe = Tokenizer.from_file(str(folder / "tokenizer.json"))
            bpe.post_processor = None  # we add BOS/EOS ourselves
        else:
            raise WeightsError(f"{folder}: no vocab.json + merges.txt (or tokenizer.json) in the tokenizer folder")
        pad = _token_str(special.get("pad_token")) or _token_str(cfg.get("pad_token")) or EOS
        max_len = cfg.get("model_max_length", 77)
        number = isinstance(max_len, (int, float)) and not isinstance(max_len, bool)
        if number and max_len > 10_000:
            max_len = 77  # transformers writes ~1e30 (an int or a float) when unset
        elif not number or not isinstance(max_len, int) or max_len < 2:
            raise WeightsError(f"{folder / 'tokenizer_config.json'}: model_max_length must be an integer >= 2 "
                               f"(BOS and EOS), got {max_len!r}")
        return cls(bpe, model_max_length=max_len, pad_token=pad)

    def save(self, folder: str | Path) -> None:
        """Write vocab.json, merges.txt and the configs transformers' CLIPTokenizer reads."""
        from persguard_jax.io import atomic_write, save_json
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        model = json.loads(self.bpe.to_str())["model"]
        save_json(model["vocab"], folder / "vocab.json")
        merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]

        def write(tmp):
            Path(tmp).write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
        atomic_write(folder / "merges.txt", write)
        save_json({"tokenizer_class": "CLIPTokenizer", "model_max_length": self.model_max_length,
                   "bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": self.pad_token,
                   "do_lower_case": True}, folder / "tokenizer_config.json")
        save_json({"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": self.pad_token},
                  folder / "special_tokens_map.json")

    def __call__(self, texts: str | Sequence[str], max_length: int | None = None) -> np.ndarray:
        """int32 ids ``(B, max_length)``: BOS, tokens (truncated), EOS, padding."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        n = max_length or self.model_max_length
        ids = np.full((len(texts), n), self.pad_id, dtype=np.int32)
        for row, enc in enumerate(self.bpe.encode_batch(texts, add_special_tokens=False)):
            toks = [self.bos_id, *enc.ids[: n - 2], self.eos_id]
            ids[row, : len(toks)] = toks
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        keep = [int(i) for i in ids if int(i) not in (self.bos_id, self.eos_id, self.pad_id)]
        return self.bpe.decode(keep).replace("</w>", " ").strip()
