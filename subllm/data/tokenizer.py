"""Tokenizers: train a byte-level BPE, or load an existing tokenizer, as a transformers fast tokenizer.

`train_tokenizer` trains a byte-level BPE with HF `tokenizers` (every byte is in the vocabulary, so any
text round-trips) with special tokens `<pad>` = 0, `<s>` = 1, `</s>` = 2 (the model config defaults),
wraps it as a `transformers.PreTrainedTokenizerFast` and saves it with `save_pretrained(out_dir)`, so
`AutoTokenizer.from_pretrained(out_dir)` loads it. Encoding adds no special tokens; packed data separates
documents with `</s>` (see `packing`).

`load_tokenizer` accepts a tokenizer folder (anything `AutoTokenizer` reads locally), a bare
`tokenizer.json`, or a SentencePiece `.model` file (needs `sentencepiece` + `protobuf`). It always goes
through `from_pretrained(folder)`: in transformers 5, building e.g. `GPT2TokenizerFast(vocab_file=...,
merges_file=...)` directly silently yields a one-token vocabulary.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from subllm.errors import SubLLMError

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
SPECIAL_TOKENS = (PAD, BOS, EOS)  # ids 0, 1, 2
MIN_VOCAB = 256 + len(SPECIAL_TOKENS)
# every file a tokenizer folder may hold (what checkpoints and conversions copy alongside weights)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
)


def _iter_training_texts(texts_or_files: str | Path | Iterable[str | Path]) -> Iterator[str]:
    from subllm.data.texts import iter_documents

    if isinstance(texts_or_files, str | Path):
        yield from (text for _, text in iter_documents(texts_or_files))
        return
    for item in texts_or_files:
        if isinstance(item, Path):
            yield from (text for _, text in iter_documents(item))
        else:
            yield item


def train_tokenizer(
    texts_or_files: str | Path | Iterable[str | Path],
    vocab_size: int,
    out_dir: str | Path | None = None,
    min_frequency: int = 2,
):
    """Train a byte-level BPE of `vocab_size` tokens (incl. `<pad>` 0, `<s>` 1, `</s>` 2).

    `texts_or_files` is a corpus path (str or Path: file or folder, as `load_texts` accepts) or an
    iterable of texts (str) and/or files (Path). Saves to `out_dir` when given; returns the
    `PreTrainedTokenizerFast`.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    if not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB:
        raise SubLLMError(f"--vocab-size must be an integer >= {MIN_VOCAB} (256 bytes + 3 special tokens)")
    if vocab_size > 2**32:
        raise SubLLMError("--vocab-size must be below 2**32")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    seen = 0

    def counted() -> Iterator[str]:
        nonlocal seen
        for text in _iter_training_texts(texts_or_files):
            seen += 1
            yield text

    tok.train_from_iterator(counted(), trainer=trainer)
    if not seen:
        raise SubLLMError("empty corpus: no text to train the tokenizer on")
    for i, token in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(token) == i, (token, tok.token_to_id(token))
    fast = wrap_tokenizer(tok)
    if out_dir is not None:
        save_tokenizer(fast, out_dir)
    return fast


def wrap_tokenizer(tok):
    """A `tokenizers.Tokenizer` with our special tokens -> `transformers.PreTrainedTokenizerFast`."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, bos_token=BOS, eos_token=EOS, model_max_length=1 << 30
    )


def save_tokenizer(tokenizer, out_dir: str | Path) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(out))
    return out


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the tokenizer's canonical `tokenizers` JSON: equal fingerprints encode text identically."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise SubLLMError(f"{type(tokenizer).__name__} is not a fast (tokenizers-backed) tokenizer")
    return hashlib.sha256(backend.to_str().encode("utf-8")).hexdigest()


def _from_folder(folder: Path, shown: str):
    from transformers import AutoTokenizer

    try:
        import subllm.hf  # noqa: F401  (registers model_type "subllm": no warning for checkpoint folders)

        tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except ImportError as e:
        raise SubLLMError(f"loading the tokenizer {shown} needs a missing package: {e}") from e
    except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError) as e:
        raise SubLLMError(f"cannot load a tokenizer from {shown} ({type(e).__name__}: {e})") from e
    if getattr(tok, "backend_tokenizer", None) is None:
        raise SubLLMError(f"{shown} loaded as a slow tokenizer ({type(tok).__name__}); a fast one is needed")
    return tok


def _special_tokens_of(tokenizer_json: Path) -> dict[str, str]:
    """Guess pad/bos/eos/unk for a bare tokenizer.json from the names of its added special tokens."""
    try:
        added = json.loads(tokenizer_json.read_text(encoding="utf-8")).get("added_tokens", [])
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SubLLMError(f"{tokenizer_json} is not a tokenizers JSON file ({e})") from e
    names = {t["content"] for t in added if t.get("special")}
    roles = {
        "pad_token": ("<pad>", "[PAD]", "<|pad|>"),
        "bos_token": ("<s>", "<|begin_of_text|>", "[CLS]"),
        "eos_token": ("</s>", "<|endoftext|>", "<|end_of_text|>", "[SEP]"),
        "unk_token": ("<unk>", "[UNK]"),
    }
    return {role: next(c for c in cands if c in names) for role, cands in roles.items() if names & set(cands)}


def load_tokenizer(path: str | Path):
    """A fast transformers tokenizer from a folder, a `tokenizer.json` or a SentencePiece `.model`."""
    p = Path(path)
    if not p.exists():
        raise SubLLMError(f"no such tokenizer file or folder: {p}")
    if p.is_dir():
        known = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
        if not any((p / name).is_file() for name in known):
            raise SubLLMError(
                f"{p} holds no tokenizer ({', '.join(known)}): train one with `subllm data tokenizer`"
            )
        return _from_folder(p, str(p))
    with tempfile.TemporaryDirectory(prefix="subllm-tok-") as tmp:
        if p.suffix == ".json":
            shutil.copy(p, Path(tmp) / "tokenizer.json")
            config = {"tokenizer_class": "PreTrainedTokenizerFast", **_special_tokens_of(p)}
        elif p.suffix == ".model":
            try:
                import google.protobuf  # noqa: F401
                import sentencepiece  # noqa: F401
            except ImportError as e:
                raise SubLLMError(
                    f"loading the SentencePiece model {p} needs `sentencepiece` and `protobuf` "
                    "(pip install sentencepiece==0.2.3 protobuf==7.36.2)"
                ) from e
            shutil.copy(p, Path(tmp) / "tokenizer.model")
            config = {
                "tokenizer_class": "LlamaTokenizer",
                "bos_token": BOS,
                "eos_token": EOS,
                "unk_token": "<unk>",
            }
        else:
            raise SubLLMError(
                f"{p}: expected a tokenizer folder, a tokenizer.json or a SentencePiece .model file"
            )
        (Path(tmp) / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
        tok = _from_folder(Path(tmp), str(p))
    if tok.pad_token is None and PAD in tok.get_vocab():
        tok.pad_token = PAD
    return tok


def load_tokenizer_for(checkpoint, tokenizer=None):
    """The tokenizer at `tokenizer`, else the one saved in the checkpoint (a model folder or a run
    folder, as `subllm.model.io.resolve_checkpoint` reads them)."""
    from subllm.model.io import resolve_checkpoint

    if tokenizer is not None:
        return load_tokenizer(tokenizer)
    ck = resolve_checkpoint(checkpoint)
    if not any((ck / n).is_file() for n in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        raise SubLLMError(f"{ck} holds no tokenizer: pass --tokenizer DIR")
    return load_tokenizer(ck)
