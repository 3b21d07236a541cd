"""``megedit serve --run DIR``: serve an edited run over HTTP (OpenAI-style completions with provenance).

The run is loaded and warmed up before the server listens, so a missing or broken run stops the
command with one message (exit status 2) instead of a server that fails every request. See
docs/serving.md for the API.
"""

from __future__ import annotations

import argparse
import functools
import logging
import sys

from megedit.defaults import DEFAULT_STEPS
from megedit.serve.options import ServeOptions


def build_parser() -> argparse.ArgumentParser:
    d = ServeOptions()  # one place per default: the options dataclass
    p = argparse.ArgumentParser(prog="megedit serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="run directory with prepare/ encoder/ familiarity/ diffusion/")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (the admin endpoint has no "
                   "authentication: keep it on localhost or behind a proxy)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--plain", action="store_true",
                   help="serve the same LM with no neuron and no router (the baseline of bench/serve.py)")
    g = p.add_argument_group("batching")
    g.add_argument("--max-batch", type=int, default=d.max_batch, help="prompts per model call")
    g.add_argument("--batch-window-ms", type=float, default=d.batch_window_ms,
                   help="how long a batch that is not full waits for more requests")
    g.add_argument("--max-queued-requests", type=int, default=d.max_queued_requests,
                   help="waiting requests beyond which new ones get 503")
    g = p.add_argument_group("request limits")
    g.add_argument("--max-prompt-chars", type=int, default=d.max_prompt_chars)
    g.add_argument("--max-tokens-limit", type=int, default=d.max_tokens_limit,
                   help="the largest max_tokens a request may ask for")
    g.add_argument("--default-max-tokens", type=int, default=d.default_max_tokens,
                   help="max_tokens of a request that gives none")
    g = p.add_argument_group("the edited model (as megedit ask)")
    g.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="DDIM steps (as megedit ask and EditedLM)")
    g.add_argument("--noise-scale", type=float, default=None,
                   help="sampling temperature (initial-noise scale, 0..1); default: the generator's own")
    g.add_argument("--value-scale", type=float, default=None,
                   help="factor on the generated neurons' value vectors; default: the generator's own")
    g.add_argument("--device", default="cpu")
    g.add_argument("--torch-threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        options = ServeOptions(max_batch=args.max_batch, batch_window_ms=args.batch_window_ms,
                               max_prompt_chars=args.max_prompt_chars, max_tokens_limit=args.max_tokens_limit,
                               default_max_tokens=args.default_max_tokens,
                               max_queued_requests=args.max_queued_requests, plain=args.plain)
    except ValueError as exc:
        parser.error(str(exc))
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError as exc:
        print(f"megedit serve needs FastAPI and uvicorn ({exc}): pip install 'megedit[serve]'", file=sys.stderr)
        return 2
    import torch

    from megedit.artifacts import ArtifactError
    from megedit.serve.app import create_app
    from megedit.serve.engine import Engine

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    load = functools.partial(Engine.load, plain=args.plain, steps=args.steps, noise_scale=args.noise_scale,
                             value_scale=args.value_scale, device=args.device)
    try:
        engine = load(args.run)
    except (ArtifactError, OSError, ValueError) as exc:
        print(f"megedit serve: cannot serve run {args.run}: {exc}", file=sys.stderr)
        return 2
    uvicorn.run(create_app(engine, options, load), host=args.host, port=args.port, log_level=args.log_level)
    return 0
