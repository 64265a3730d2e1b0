"""`llama2 serve`: load a model, bind a socket, run the app under uvicorn until a signal."""

from __future__ import annotations

import argparse
import ipaddress
import os
import signal
import socket
import sys
import threading
from pathlib import Path

import torch
import uvicorn
from uvicorn.server import HANDLED_SIGNALS

from ..errors import Llama2Error
from ..generation import Llama
from ..loader import load_model
from .api import create_app
from .engine import Engine

__all__ = ["API_KEY_ENV", "bind_socket", "build_for_serving", "run_server", "serve_command"]

API_KEY_ENV = "LLAMA2_API_KEY"
DEFAULT_SERVE_SEQ_LEN = 2048
SHUTDOWN_GRACE_S = 30


def serve_command(args: argparse.Namespace) -> int:
    """`llama2 serve`: the parsed command line to a running server."""
    if args.max_batch_size < 1 or args.max_queue < 0:
        raise Llama2Error("--max-batch-size must be at least 1 and --max-queue at least 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    llama = build_for_serving(
        args.model,
        max_batch_size=args.max_batch_size,
        max_seq_len=args.max_seq_len,
        tokenizer_path=args.tokenizer,
        device=args.device,
        dtype=getattr(torch, args.dtype) if args.dtype else None,
        chat_format=args.chat_format,
        quant=args.quant,
        native=args.native,
    )
    return run_server(
        llama,
        model_name=args.served_model_name or _model_name(args.model),
        host=args.host,
        port=args.port,
        api_key=args.api_key or os.environ.get(API_KEY_ENV),
        max_queue=args.max_queue,
    )


def _model_name(source: str) -> str:
    """A registry name as is; a path by its file or folder name."""
    path = Path(source)
    return path.name if path.exists() else source


def build_for_serving(
    source: str, *, max_batch_size: int, max_seq_len: int | None, native: bool = True, **load_options
) -> Llama:
    """Load a model with `max_batch_size` KV-cache slots of `max_seq_len` tokens each.

    Args:
        source: as for `llama2.loader.load_model`.
        max_batch_size: KV-cache slots.
        max_seq_len: context of each slot (default: the model's, at most 2048).
        native: as for `Llama`.
        load_options: more `load_model` options (tokenizer_path, device, dtype, chat_format, quant).
    """
    loaded = load_model(source, **load_options)
    context = loaded.args.max_seq_len
    seq_len = min(context, DEFAULT_SERVE_SEQ_LEN) if max_seq_len is None else max_seq_len
    if not 2 <= seq_len <= context:
        raise Llama2Error(f"--max-seq-len must be between 2 and the model's context of {context}, got {seq_len}")
    return Llama.from_loaded(loaded, seq_len, max_batch_size, native=native)


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0 picks a free one).

    Raises:
        Llama2Error: the address is taken, unknown or not ours.
    """
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        family = socket.AF_INET  # a host name such as "localhost"
    try:
        return socket.create_server((host, port), family=family, backlog=2048)
    except (OSError, OverflowError) as err:
        raise Llama2Error(f"cannot listen on {host}:{port}: {err}") from None


def _serve_http(server: uvicorn.Server, sock: socket.socket, engine: Engine) -> None:
    """The HTTP event loop (in a thread); stopping it stops the engine, however it ends."""
    try:
        server.run(sockets=[sock])
    finally:
        engine.stop()


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def run_server(
    llama: Llama,
    *,
    model_name: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    max_queue: int = 64,
    log_level: str = "warning",
) -> int:
    """Serve `llama` over HTTP until SIGINT/SIGTERM; in-flight requests finish first.

    The engine runs in this (the main) thread and uvicorn's event loop in another; the
    signals go to uvicorn's handler, which starts its graceful shutdown (stop accepting,
    let open responses finish for up to 30 s, cancel the rest, then the app's shutdown
    stops the engine).

    Returns:
        0 after a clean shutdown.
    """
    engine = Engine(llama, max_queue=max_queue)
    app = create_app(engine, model_name, api_key)
    sock = bind_socket(host, port)
    bound_host, bound_port = sock.getsockname()[:2]
    url_host = f"[{bound_host}]" if ":" in bound_host else bound_host
    print(
        f"llama2 serve: {model_name} on http://{url_host}:{bound_port}/ "
        f"({engine.num_slots} slots of {engine.max_seq_len} tokens; API key {'required' if api_key else 'off'})",
        file=sys.stderr,
        flush=True,
    )
    if not api_key and not _is_loopback(host):
        print("llama2 serve: warning: listening beyond this machine without --api-key", file=sys.stderr, flush=True)
    config = uvicorn.Config(
        app, log_level=log_level, access_log=False, timeout_graceful_shutdown=SHUTDOWN_GRACE_S, lifespan="on"
    )
    server = uvicorn.Server(config)
    http = threading.Thread(target=_serve_http, args=(server, sock, engine), name="llama2-http")
    previous = {sig: signal.signal(sig, server.handle_exit) for sig in HANDLED_SIGNALS}  # uvicorn's own handler
    try:
        engine.open()  # before the app's lifespan starts, so it does not start a worker thread
        http.start()
        engine.run()  # here, in the main thread, until the app shuts down
        http.join()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        sock.close()
    print("llama2 serve: stopped", file=sys.stderr, flush=True)
    return 0
