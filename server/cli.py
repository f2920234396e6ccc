"""``teacher-farm serve``: vLLM's own engine flags, plus the service's."""

from __future__ import annotations

import argparse
import logging
import sys

from teacher_farm.schemas.scoring import SCORING_CHOICES
from teacher_farm.server.preflight import check_model, exposure_warning
from teacher_farm.server.settings import ServerSettings, configure

#: Exit status of ``serve`` when its engine died: non-zero, so that a supervisor restarts it.
ENGINE_DEAD_EXIT = 4
#: How long requests in flight get to finish on SIGINT/SIGTERM.
GRACEFUL_S = 300
#: The same once the engine died: nothing in flight can succeed any more, so the exit need not wait.
DEAD_GRACEFUL_S = 10


def build_parser() -> argparse.ArgumentParser:
    """Every vLLM engine flag (defaults left to the engine), then the service's flags."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(
        prog="teacher-farm serve",
        description="Serve a teacher model's top-k next-token distributions over HTTP.",
    )
    AsyncEngineArgs.add_cli_args(parser)
    # Only flags the user gives reach the engine; our scoring defaults fill in the rest.
    for action in parser._actions:
        if action.dest != "help":
            action.default = argparse.SUPPRESS
    ours = parser.add_argument_group("teacher-farm")
    ours.add_argument("--host", default=None, help="address to listen on (default 0.0.0.0)")
    ours.add_argument("--port", type=int, default=None, help="port to listen on (default 8000)")
    ours.add_argument("--k-max", type=int, default=None, help="largest k a request may ask for (default 256)")
    ours.add_argument(
        "--scoring",
        choices=SCORING_CHOICES,
        default=None,
        help="pooled: reduce logits inside the vLLM worker (temperature, sampled targets, any k); "
        "prompt-logprobs: vLLM's API; auto (default): pooled where the architecture allows",
    )
    ours.add_argument(
        "--slice-rows",
        type=int,
        default=None,
        help="positions reduced at once in the worker (pooled; default 1024 on a GPU, 256 on a CPU): "
        "peak ~ rows x vocab x 15 B",
    )
    ours.add_argument(
        "--max-samples", type=int, default=None, help="largest 'samples' a request may ask for (default 256)"
    )
    ours.add_argument("--api-key", default=None, help="require this bearer token (or TEACHER_FARM_API_KEY)")
    ours.add_argument("--max-queued-tokens", type=int, default=None, help="beyond this, answer 429")
    ours.add_argument(
        "--max-answer-bytes",
        type=int,
        default=None,
        help="estimated answer size of one request beyond which it gets 413 (default 8 GiB)",
    )
    ours.add_argument(
        "--max-answer-bytes-in-flight",
        type=int,
        default=None,
        help="estimated answer bytes admitted and not yet sent beyond which requests get 429 "
        "(default 16 GiB)",
    )
    ours.add_argument(
        "--max-connections",
        type=int,
        default=None,
        help="connections and requests at once beyond which requests get 503 (default 512)",
    )
    ours.add_argument("--uvicorn-log-level", default="info", help="log level of the HTTP server")
    ours.add_argument("--ssl-certfile", default=None, help="serve HTTPS with this certificate (PEM)")
    ours.add_argument("--ssl-keyfile", default=None, help="the certificate's private key (PEM)")
    ours.add_argument("-v", "--verbose", action="store_true", help="show vLLM's own INFO logs")
    return parser


def connection_limits(settings: ServerSettings) -> dict:
    """uvicorn's options that bound connections: their number, idle time, and time to send their headers."""
    from teacher_farm.server.connections import protocol

    return {
        "limit_concurrency": settings.max_connections,
        "timeout_keep_alive": settings.keep_alive_s,
        "http": protocol(settings.header_timeout_s),
        # A request line and headers larger than this (h11's default) are refused with 400.
        "h11_max_incomplete_event_size": 16 * 1024,
    }


def main(argv: list[str] | None = None) -> None:
    """Parse flags, then run the app under uvicorn until SIGINT/SIGTERM (in-flight requests finish).

    Exits with :data:`ENGINE_DEAD_EXIT` when the engine died (``server/app.py`` says when), and with
    uvicorn's start-up failure status (3) when it failed to start.
    """
    # A missing model is one line, before vLLM is even imported (which takes seconds).
    early = argparse.ArgumentParser(add_help=False)
    early.add_argument("--model")
    if (model := early.parse_known_args(argv)[0].model) is not None:
        check_model(model)

    import uvicorn

    from teacher_farm.server import vllm_seam
    from teacher_farm.server.app import create_app
    from teacher_farm.server.engine import Engine, choose_backend

    parser = build_parser()
    args = vars(parser.parse_args(argv))
    if "model" not in args:
        parser.error("--model is required (a local checkpoint directory or a model name)")
    ours = {
        name: args.pop(name)
        for name in (
            "host",
            "port",
            "k_max",
            "api_key",
            "max_queued_tokens",
            "scoring",
            "slice_rows",
            "max_samples",
            "max_answer_bytes",
            "max_answer_bytes_in_flight",
            "max_connections",
        )
    }
    log_level = args.pop("uvicorn_log_level")
    args.pop("verbose")  # read before vLLM was imported (teacher_farm.exits.quiet_engine)
    tls = {"ssl_certfile": args.pop("ssl_certfile"), "ssl_keyfile": args.pop("ssl_keyfile")}
    if bool(tls["ssl_certfile"]) != bool(tls["ssl_keyfile"]):
        parser.error("--ssl-certfile and --ssl-keyfile go together")
    # Flags win over TEACHER_FARM_* variables, which win over the defaults.
    settings = ServerSettings(**{k: v for k, v in ours.items() if v is not None}, engine_args=args)
    configure(settings)
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger(__name__)
    if warning := exposure_warning(settings.host, settings.api_key is not None):
        log.warning(warning)
    if warning := vllm_seam.check_release():
        log.warning(warning)
    if settings.scoring == "pooled":
        # A pooled backend that cannot run here stops serve now, in one line, not after the app starts.
        engine_args = settings.engine_args
        choose_backend(
            "pooled",
            engine_args["model"],
            bool(engine_args.get("trust_remote_code")),
            engine_args.get("hf_overrides"),
        )

    def stop_dead() -> None:
        # What SIGTERM does, with less grace: the process then exits with ENGINE_DEAD_EXIT.
        config.timeout_graceful_shutdown = DEAD_GRACEFUL_S
        server.should_exit = True

    app = create_app(
        lambda: Engine.load(
            settings.engine_args,
            settings.k_max,
            scoring=settings.scoring,
            slice_rows=settings.slice_rows,
            max_samples=settings.max_samples,
        ),
        on_engine_dead=stop_dead,
        warm_up=Engine.warm_up,
    )
    # uvicorn.run's steps, with the server at hand so that the app can stop it.
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=log_level,
        timeout_graceful_shutdown=GRACEFUL_S,
        access_log=False,
        **tls,
        **connection_limits(settings),
    )
    server = uvicorn.Server(config)
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    if getattr(app.state, "engine_dead", False):
        sys.exit(ENGINE_DEAD_EXIT)
    if not server.started or getattr(app.state, "load_error", None):
        from uvicorn.main import STARTUP_FAILURE

        sys.exit(STARTUP_FAILURE)
