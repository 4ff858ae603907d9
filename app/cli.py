"""``echo-at-time``: one command for every process, and the all-in-one local stack."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

from app.log import configure, get_logger
from app.ops import commands, schedule_commands
from app.settings import Settings, SettingsError
from app.supervise import TaskDied

log = get_logger("cli")


def _settings_epilog() -> str:
    lines = ["settings (environment variables):"]
    for variable, default, doc in Settings.documentation():
        lines.append(f"  {variable} (default {default})\n      {doc}")
    return "\n".join(lines)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"invalid {text!r}: a number of seconds greater than 0")
    return value


def _partitions(text: str) -> int:
    from app.settings import MAX_PARTITIONS

    if not (text.isascii() and text.isdigit() and 1 <= int(text) <= MAX_PARTITIONS):
        raise argparse.ArgumentTypeError(f"invalid {text!r}: from 1 to {MAX_PARTITIONS}")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="echo-at-time",
        description="Delayed messages on Redis, handled once at their time.",
        epilog=_settings_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    api = sub.add_parser("api", help="serve the HTTP API (uvicorn)")
    api.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    api.add_argument("--port", type=int, default=8080, help="port to bind (default 8080)")

    sub.add_parser("scheduler", help="join the leader election; the leader promotes due messages")

    worker = sub.add_parser("worker", help="consume due messages from the stream")
    worker.add_argument("--concurrency", type=int, default=16, help="handlers at once (16)")
    worker.add_argument(
        "--consumer-name", default=None, help="consumer name in the group (default: host-pid)"
    )
    worker.add_argument(
        "--handler",
        default="echo",
        help="'echo' (default), 'list' (LPUSH onto a legacy list), 'webhook' (a signed "
        "HTTP POST: docs/webhooks.md) or 'package.module:callable'",
    )
    worker.add_argument(
        "--handler-timeout",
        type=_seconds,
        default=None,
        metavar="SECONDS",
        help="longest a handler may run before the delivery fails (default: EAT_HANDLER_TIMEOUT)",
    )
    worker.add_argument(
        "--list-name",
        default=None,
        help="with --handler list: the list to push onto (default: EAT_LEGACY_QUEUE)",
    )

    up = sub.add_parser(
        "up",
        help="all-in-one local stack: Redis and ZooKeeper if not configured, then every process",
    )
    up.add_argument("--host", default="127.0.0.1", help="API address (default 127.0.0.1)")
    up.add_argument("--port", type=int, default=8080, help="API port (default 8080)")
    up.add_argument(
        "--data-dir", default=".echo-at-time", help="where the local Redis and ZooKeeper keep data"
    )
    up.add_argument("--schedulers", type=int, default=2, help="scheduler processes (2)")
    up.add_argument("--workers", type=int, default=2, help="worker processes (2)")
    up.add_argument(
        "--cluster",
        action="store_true",
        help="a local 3-master Redis Cluster instead of one Redis (unless EAT_REDIS_URL is set)",
    )
    up.add_argument(
        "--partitions",
        type=_partitions,
        default=16,
        help="with --cluster: EAT_PARTITIONS for the processes, unless set (16)",
    )
    commands.add_commands(sub)
    schedule_commands.add_commands(sub)
    return parser


def _fail(message: str) -> int:
    print(f"echo-at-time: {message}", file=sys.stderr)
    return 2


def _died(exc: TaskDied) -> int:
    """A loop of the process died (logged with its traceback): exit non-zero, to be restarted."""
    print(f"echo-at-time: {exc}; exiting to be restarted", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        return _fail(f"invalid setting {exc}")
    configure(settings.log_format, settings.log_level, process=args.command)

    if args.command in commands.COMMANDS:
        return commands.run(args, settings)
    if args.command == schedule_commands.COMMAND:
        return schedule_commands.run(args, settings)
    if args.command == "api":
        if not 0 < args.port < 65536:
            return _fail("--port must be between 1 and 65535")
        return run_api(settings, args.host, args.port)
    if args.command == "scheduler":
        from app.store import StorageFormatError
        from app.store.memory import EvictingPolicyError
        from election.bridge import LegacyListsError
        from election.scheduler import run_scheduler

        try:
            _run_async(run_scheduler(settings))
        except (StorageFormatError, EvictingPolicyError, LegacyListsError) as exc:
            return _fail(str(exc))
        except TaskDied as exc:
            return _died(exc)
        return 0
    if args.command == "worker":
        from app.store import StorageFormatError
        from app.store.memory import EvictingPolicyError
        from workers.handlers import HandlerSpecError
        from workers.process import run_worker

        if args.concurrency < 1:
            return _fail("--concurrency must be at least 1")
        try:
            _run_async(
                run_worker(
                    settings,
                    args.consumer_name,
                    args.concurrency,
                    args.handler,
                    args.list_name,
                    handler_timeout=args.handler_timeout,
                )
            )
        except (HandlerSpecError, StorageFormatError, EvictingPolicyError) as exc:
            return _fail(str(exc))
        except TaskDied as exc:
            return _died(exc)
        return 0
    if args.command == "up":
        from app.ops.stack import run_stack

        return run_stack(args)
    parser.error(f"unknown command {args.command}")
    return 2


def _run_async(coro) -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop ships with uvicorn[standard]
        asyncio.run(coro)
    else:
        uvloop.run(coro)


def run_api(settings: Settings, host: str, port: int) -> int:
    import uvicorn

    from app.http.app import create_app
    from app.httpserver import HttpLimits, fit_open_files, server_config

    server: uvicorn.Server | None = None

    def stop() -> None:
        # A check after start-up refused Redis' data: shut down, then exit 2 (below).
        if server is not None:
            server.should_exit = True

    app = create_app(settings, stop)
    config = server_config(
        app,
        host,
        port,
        fit_open_files(HttpLimits.of(settings)),
        loop="uvloop",
        lifespan="on",
        timeout_graceful_shutdown=20,
    )
    server = uvicorn.Server(config)
    # uvicorn re-raises the signal it shut down for once it is done, which would end
    # the process with 143; a no-op handler in place makes a graceful stop exit 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    log.info("api listening", host=host, port=port)
    try:
        server.run()
    except SystemExit:  # uvicorn's exit code 3 when the start-up (lifespan) failed
        if getattr(app.state, "refused", None) is None:
            raise
    # A start-up check refused this Redis (StorageFormatError, EvictingPolicyError): exit 2
    # naming why, as the scheduler and the worker do.
    refused = getattr(app.state, "refused", None)
    if refused is not None:
        return _fail(str(refused))
    return 0 if server.started else 1


if __name__ == "__main__":
    sys.exit(main())
