"""Helpers of the `subllm serve` tests: a tiny checkpoint whose tokenizer names every id (so equal
texts mean equal token ids), a live uvicorn server on 127.0.0.1 in a thread, and solo references."""

import socket
import threading
import time

import torch
from helpers import tiny_preset_model

from subllm import generate

V = 256
EOS = 2


def full_vocab_tokenizer():
    """Word-level tokenizer over all 256 ids: <pad> <s> </s> <unk> w4 .. w255."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{f"w{i}": i for i in range(4, V)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def tiny_checkpoint(path):
    """(model, tokenizer) saved to `path`: `tiny_preset_model` (a real mix of kept and dropped
    tokens at every S) and `full_vocab_tokenizer`."""
    model = tiny_preset_model()
    tok = full_vocab_tokenizer()
    model.save_pretrained(path)
    tok.save_pretrained(str(path))
    return model, tok


def solo(model, tok, prompt: list[int], max_tokens: int, stop=(), ignore_eos=False, **kw):
    """What `generate()` gives for this prompt alone: (text as the server returns it, tokens used)."""
    out = generate(
        model,
        torch.tensor([prompt]),
        max_new_tokens=max_tokens,
        eos_token_id=None if ignore_eos else EOS,
        **kw,
    )[0, len(prompt) :].tolist()
    if not ignore_eos and EOS in out:
        out = out[: out.index(EOS) + 1]
    text = tok.decode(out, skip_special_tokens=True)
    n = len(out)
    for k in range(1, len(out) + 1):  # a stop string ends the text at the token that completes it
        t = tok.decode(out[:k], skip_special_tokens=True)
        hits = [t.find(s) for s in stop if s in t]
        if hits:
            return t[: min(hits)], k
    return text, n


def prompts(n: int, seed: int = 5, lo: int = 3, hi: int = 40) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randint(4, V, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()
        for _ in range(n)
    ]


class LiveServer:
    """uvicorn serving `app` on a free 127.0.0.1 port in a background thread, with `subllm serve`'s
    connection limits (subllm/serve/connections.py)."""

    def __init__(
        self,
        app,
        shutdown_timeout=5.0,
        max_connections=512,
        header_timeout=10.0,
        batcher=None,
        drain_timeout=5.0,
    ):
        """`batcher`: serve with `subllm serve`'s DrainingServer (handle_exit = SIGTERM) and this
        --shutdown-timeout; `shutdown_timeout` is uvicorn's own (the flush after the drain)."""
        import uvicorn

        from subllm.serve.connections import limited_protocol
        from subllm.serve.shutdown import DrainingServer

        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        cfg = uvicorn.Config(
            app,
            http=limited_protocol(max_connections, header_timeout),
            lifespan="on",
            log_level="error",
            timeout_graceful_shutdown=shutdown_timeout,
        )
        self.server = uvicorn.Server(cfg) if batcher is None else DrainingServer(cfg, batcher, drain_timeout)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(20)
