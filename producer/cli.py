"""The ``m3q`` command line. Every setting is an ``M3Q_*`` variable, and a ``--flag`` of each command that reads
it (``COMMAND_SETTINGS`` in producer.contract.settings)."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import fields
from typing import Sequence

from producer.cli_support import CommandParser, check_command, install_hint, show_wait_progress
from producer.contract.errors import ConfigError, M3QError
from producer.contract.settings import Settings, command_settings


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``m3q``."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    check_command(parser, argv)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.command in ("worker", "demo", "milvus", "serve") else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # pymilvus logs a traceback for errors that m3q already reports in one clear line.
    logging.getLogger("pymilvus").setLevel(logging.CRITICAL)
    show_wait_progress(args.command)
    try:
        settings = Settings.from_env(**{f.name: getattr(args, f.name, None) for f in fields(Settings)})
        _check_broker(args, settings)
        return int(args.run(args, settings) or 0)
    except KeyboardInterrupt:
        return 130
    except ModuleNotFoundError as e:
        extra = _extra_providing(e.name or "")
        if extra is None:
            raise
        print(f"m3q {args.command}: needs {e.name}, which is not installed: install the {extra} extra: "
              f"{install_hint(extra)}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - one clear line instead of a traceback for expected failures
        if _expected(e):
            print(f"m3q {args.command}: {e}", file=sys.stderr)
            return 2
        raise


def _expected(e: Exception) -> bool:
    # Every error m3-queue raises on purpose is an M3QError (producer/contract/errors.py); a missing file is the one
    # builtin error that is the user's, not a bug. Anything else keeps its traceback.
    return isinstance(e, (M3QError, FileNotFoundError))


REDIS_COMMANDS = {"worker", "encode", "index", "search", "status", "reindex", "serve"}
"""Commands that need Redis from the start (`m3q demo` starts a local one if none answers)."""


def _check_broker(args: argparse.Namespace, s: Settings) -> None:
    # A Redis that cannot be reached at start is one line in seconds, naming M3Q_BROKER_URL; the long
    # retries are for a Redis that was there and went away (docs/guarantees.md).
    if args.command in REDIS_COMMANDS and not getattr(args, "local", False):
        from producer.client import check_broker

        check_broker(s)


def _extra_providing(module: str) -> str | None:
    """The extra of m3-queue that installs ``module`` (the smallest one that lists it), or None."""
    import re
    from importlib.metadata import PackageNotFoundError, requires

    top = module.split(".")[0].lower()
    try:
        requirements = requires("m3-queue") or []
    except PackageNotFoundError:
        return None
    sizes: dict[str, int] = {}
    for r in requirements:
        for extra in re.findall(r"extra\s*==\s*['\"]([^'\"]+)", r):
            sizes[extra] = sizes.get(extra, 0) + 1
    extras = [extra for r in requirements
              if re.split(r"[\s<>=!~;\[(]", r, maxsplit=1)[0].lower().replace("-", "_") == top
              for extra in re.findall(r"extra\s*==\s*['\"]([^'\"]+)", r)]
    return min(extras, key=lambda e: (sizes[e], e)) if extras else None


INDEX_EXIT_RULE = ("Exit status: 0 when at least one document was stored or skipped as unchanged (rejected rows are "
                   "listed, not fatal); 1 when rows were read but none was stored or skipped; 2 for an error before "
                   "indexing (the file, Milvus, the collection); 130 when interrupted.")
"""How `m3q index` exits, stated in its --help."""
TEXT_FIELD_HELP = "Field (JSONL) or column (CSV, Parquet) holding the text (default: text)"
ID_FIELD_HELP = "Field or column holding the id (default: id; without one, FILE:LINE)"


def build_parser() -> argparse.ArgumentParser:
    """All sub-commands: each one's own options first, then the settings it reads as flags in a group of their
    own."""
    parser = argparse.ArgumentParser(prog="m3q",
                                     description="BGE-M3 embeddings on a Celery + Redis queue, into Milvus.")
    parser.add_argument("--version", action="version", version=f"m3q {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=CommandParser)
    commands: dict[str, argparse.ArgumentParser] = {}

    def command(name: str, run, help: str, epilog: str | None = None) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help, epilog=epilog)
        p.set_defaults(run=run)
        commands[name] = p
        return p

    for add in (_queue_commands, _reindex_command, _service_commands):
        add(command)
    for name, p in commands.items():
        _add_settings(p, command_settings(name))
    return parser


def _queue_commands(command) -> None:
    p = command("worker", cmd_worker, "Run a worker pinned to one device (loads the model before taking jobs).")
    p.add_argument("--queues",
                   help="Comma-separated queues to consume (default: queries, documents, this device's queue)")
    p.add_argument("--hostname", help="Celery node name (default m3q-DEVICE-PID@host)")
    p.add_argument("--loglevel", default="INFO", help="Log level of the worker (default: INFO)")

    p = command("encode", cmd_encode, "Encode JSONL from stdin ({'text', 'id'} per line) to JSONL on stdout, "
                "one output line per input line; each line is answered as soon as its job is done.")
    p.add_argument("--local", action="store_true", help="Encode in this process instead of through the queue")
    p.add_argument("--kind", choices=["documents", "queries"], default="documents",
                   help="documents (long, for indexing) or queries (short, the query stream); default: documents")
    p.add_argument("--colbert", action="store_true", help="Also output ColBERT vectors")
    p.add_argument("--route-device", help="Send the jobs to this device's queue only")

    p = command("index", cmd_index, "Index a JSONL, CSV, Parquet or text file into a Milvus collection.",
                epilog=INDEX_EXIT_RULE)
    p.add_argument("file", help="The file: .jsonl/.ndjson/.json, .csv, .parquet, anything else as text (a line each)")
    p.add_argument("--collection", required=True, help="Collection to write (created on first use)")
    p.add_argument("--text-field", default="text", help=TEXT_FIELD_HELP)
    p.add_argument("--id-field", default="id", help=ID_FIELD_HELP)
    p.add_argument("--force", action="store_true",
                   help="Encode every document, also those the collection holds unchanged (skipped by default)")

    p = command("search", cmd_search, "Search a collection with a query encoded by the workers.")
    p.add_argument("text", help="The query")
    p.add_argument("--collection", required=True, help="Collection (or alias) to search")
    p.add_argument("--k", type=int, default=10, help="How many hits (default: 10)")
    p.add_argument("--mode", choices=["hybrid", "dense", "sparse", "m3"], default="hybrid",
                   help="hybrid (RRF of dense and sparse), dense, sparse, or m3 (hybrid recall, rescored by all three)")

    p = command("status", cmd_status, "Live workers (device, model, dtype, rate), queue depths, failed jobs.")
    p.add_argument("--clear-failures", action="store_true", help="Forget the failed jobs listed, then show the rest")
    p = command("replica", cmd_replica,
                "Write a random-weight checkpoint in BGE-M3's format (tests, capacity planning).")
    p.add_argument("dir", help="Folder to write the checkpoint into")
    p.add_argument("--size", choices=["tiny", "small", "base", "large"], default="small",
                   help="Model size (large: BGE-M3's own shapes); default: small")
    p.add_argument("--seed", type=int, default=0, help="Seed of the random weights (default: 0)")


def _reindex_command(command) -> None:
    p = command("reindex", cmd_reindex, "Re-index a file or milvus:COLLECTION into a new collection behind an "
                "alias, resumably; the alias switches when every document is in.")
    p.add_argument("--from", dest="source", help="File (JSONL, CSV, Parquet) or milvus:COLLECTION")
    p.add_argument("--into", dest="alias", help="Alias to switch; the data goes into ALIAS_vN")
    p.add_argument("--adopt", action="store_true", help="If --into names a collection (made by `m3q index`), "
                   "first rename it to ALIAS_vN behind an alias of its name; alone with --into: only that")
    p.add_argument("--resume", metavar="JOB", help="Go on with a re-index job (skips stored batches)")
    p.add_argument("--job-id", help="Id of a new job (default: random)")
    p.add_argument("--allow-rejects", action="store_true", default=None, help="Switch even if rows were rejected")
    p.add_argument("--rate-limit", type=float, metavar="DOCS_PER_S", help="Send at most this many documents/s")
    p.add_argument("--drop-old", action="store_true", default=None,
                   help="Drop the collection the alias leaves; alone with --into: drop every unaliased ALIAS_vN")
    p.add_argument("--text-field", default="text", help=TEXT_FIELD_HELP)
    p.add_argument("--id-field", default="id", help=ID_FIELD_HELP)
    p.add_argument("--no-progress", action="store_true", help="No progress bar")


def _service_commands(command) -> None:
    command("milvus", cmd_milvus, "Run the embedded Milvus Lite server (for several workers on one machine).")
    p = command("serve", cmd_serve, "Run the HTTP gateway: OpenAI- and TEI-compatible embeddings, encode, index and "
                "search over HTTP, enqueued on Redis for the workers (docs/http-api.md).")
    p.add_argument("--host", default="127.0.0.1", help="Address to listen on (default: 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=8080, help="Port to listen on (default: 8080)")
    p.add_argument("--access-log", action="store_true", help="Log every request (off by default: /metrics counts them)")
    p = command("demo", cmd_demo, "The whole job end to end on embedded defaults: index a sample corpus, search it.")
    p.add_argument("--collection", default="m3q_demo", help="Collection for the sample corpus (default: m3q_demo)")


def _add_settings(p: argparse.ArgumentParser, names: list[str]) -> None:
    """The settings ``names`` as flags, in a group after the command's own options; the usage line names the
    command's own options only (the settings would bury them)."""
    if not names:
        return
    p.usage = p.format_usage().removeprefix("usage: ").strip() + " [settings]"
    group = p.add_argument_group("settings (also M3Q_* variables)")
    for f in fields(Settings):
        if f.name not in names:
            continue
        kind = {"int": int, "float": float, "bool": _bool}.get(str(f.type), str)
        group.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=kind, default=None,
                           help=f.metadata["doc"], metavar=f.name.upper())


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("m3-queue")
    except PackageNotFoundError:
        return "unknown (not installed)"


def _bool(raw: str) -> bool:
    if raw.lower() in ("1", "true", "yes", "on"):
        return True
    if raw.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"{raw!r} is not a boolean")


# ---- worker ---------------------------------------------------------------------------------------------

def cmd_worker(args: argparse.Namespace, s: Settings) -> int:
    """Run a Celery worker with the threads pool, reading the query stream, the Celery queues and the device queue."""
    import os
    import socket

    from worker.celery_app import make_app, worker_queues

    app = make_app(s)
    queues = args.queues or ",".join(worker_queues(s))
    hostname = args.hostname or f"m3q-{s.device.replace(':', '-')}-{os.getpid()}@{socket.gethostname()}"
    app.worker_main(["worker", "--pool=threads", f"--concurrency={s.worker_threads}", "-Q", queues,
                     "-n", hostname, f"--loglevel={args.loglevel}", "--without-gossip", "--without-mingle"])
    return 0


# ---- encode ---------------------------------------------------------------------------------------------

def cmd_encode(args: argparse.Namespace, s: Settings) -> int:
    """JSONL in, JSONL out, one output line per input line, in order."""
    from producer import jsonl

    encode = _local_encoder(s, args) if args.local else _remote_encoder(s, args)
    truncated = 0
    for chunk in jsonl.ready_batches(jsonl.read_lines(sys.stdin), 1024):
        good = [i for i, (_, _, error) in enumerate(chunk) if error is None]
        items, n = encode([chunk[i][1] for i in good]) if good else ([], 0)
        by_line = dict(zip(good, items))
        truncated += n
        for i, (doc_id, _, error) in enumerate(chunk):
            line = jsonl.item_json(doc_id, error, by_line.get(i), args.colbert)
            sys.stdout.write(json.dumps(line, ensure_ascii=False) + "\n")
        sys.stdout.flush()
    if truncated:
        limit = s.query_max_length if args.kind == "queries" else s.document_max_length
        print(f"m3q encode: {truncated} text(s) truncated to {limit} tokens", file=sys.stderr)
    return 0


def _local_encoder(s: Settings, args: argparse.Namespace):
    from worker.runtime import load_encoder

    encoder = load_encoder(s)

    def encode(texts):
        result = encoder.encode(texts, args.kind, colbert=args.colbert)
        return result.items, result.truncated
    return encode


def _remote_encoder(s: Settings, args: argparse.Namespace):
    from producer.client import Client

    client = Client(s)

    def encode(texts):
        items = client.encode(texts, args.kind, colbert=args.colbert, device=args.route_device)
        return items, sum(getattr(i, "truncated", False) for i in items)
    return encode


# ---- index, search, status ------------------------------------------------------------------------------

def cmd_index(args: argparse.Namespace, s: Settings) -> int:
    """Index a file through the queue, with a progress bar and a summary."""
    from producer.devstack import interrupt_on_sigterm
    from producer.indexing import IndexInterrupted, index_file

    interrupt_on_sigterm()  # SIGTERM (a job scheduler, `kill`) gets the summary that Ctrl-C gets
    try:
        report = index_file(s, args.file, args.collection, args.text_field, args.id_field, force=args.force)
    except IndexInterrupted as stopped:
        print(f"m3q index: {stopped}", file=sys.stderr)
        return 130
    print(report.summary())
    return 0 if report.stored or report.skipped or not (report.rejected or report.source_errors) else 1


def cmd_search(args: argparse.Namespace, s: Settings) -> int:
    """Print ranked hits: rank, score, id and a snippet."""
    from producer.search import search

    hits = search(args.text, args.collection, mode=args.mode, k=args.k, settings=s)
    if not hits:
        print("no hits")
    for rank, hit in enumerate(hits, 1):
        snippet = " ".join(str(hit.text).split())[:100]
        signals = (f"  (dense {hit.dense:.4f}, sparse {hit.sparse:.4f}, colbert {hit.colbert:.4f})"
                   if args.mode == "m3" else "")
        print(f"{rank:>3}. {hit.score:8.4f}  {hit.id}  {snippet}{signals}")
    return 0


def cmd_status(args: argparse.Namespace, s: Settings) -> int:
    """Workers, queues, failed jobs and re-index jobs."""
    from producer.status import clear_failures, collect, render

    if args.clear_failures:
        print(f"cleared {clear_failures(s)} failed job(s)")
    print(render(collect(s)))
    return 0


def cmd_reindex(args: argparse.Namespace, s: Settings) -> int:
    """Start or resume a re-index, or drop the collections an alias left behind."""
    from producer import reindex
    from producer.devstack import interrupt_on_sigterm

    interrupt_on_sigterm()  # SIGTERM gets the summary that Ctrl-C gets: the job stays resumable
    try:
        return _reindex(args, s)
    except reindex.ReindexInterrupted as stopped:
        print(f"m3q reindex: {stopped}", file=sys.stderr)
        return 130


def _reindex(args: argparse.Namespace, s: Settings) -> int:
    from producer import reindex

    if args.resume:
        report = reindex.resume_reindex(s, args.resume, allow_rejects=args.allow_rejects,
                                        rate_limit_docs_s=args.rate_limit, drop_old=args.drop_old,
                                        progress=not args.no_progress)
    elif args.source and args.alias:
        report = reindex.start_reindex(s, args.source, args.alias, allow_rejects=bool(args.allow_rejects),
                                       rate_limit_docs_s=args.rate_limit, drop_old=bool(args.drop_old),
                                       job_id=args.job_id, progress=not args.no_progress,
                                       text_field=args.text_field, id_field=args.id_field, adopt=args.adopt)
    elif args.adopt and args.alias:
        print(f"{args.alias} is now an alias of {reindex.adopt_alias(s, args.alias)}")
        return 0
    elif args.drop_old and args.alias:
        dropped = reindex.drop_unaliased(s, args.alias)
        print("\n".join(f"dropped {name}" for name in dropped) or "nothing to drop")
        return 0
    else:
        raise ConfigError("use --from SOURCE --into NAME, --resume JOB, --adopt --into NAME or --drop-old --into NAME")
    print(report.summary())
    return 0 if report.switched else 1


def cmd_replica(args: argparse.Namespace, s: Settings) -> int:
    """Write a random-weight replica checkpoint."""
    from worker.replica import write_replica

    path = write_replica(args.dir, args.size, args.seed)
    print(f"wrote a RANDOM-WEIGHT {args.size} replica to {path}; use it with M3Q_MODEL={path}")
    return 0


def cmd_serve(args: argparse.Namespace, s: Settings) -> int:
    """Run the HTTP gateway until SIGTERM (which drains the requests in flight)."""
    from producer.gateway.server import serve

    return serve(s, args.host, args.port, access_log=args.access_log)


def cmd_milvus(args: argparse.Namespace, s: Settings) -> int:
    """Run Milvus Lite in the foreground."""
    from producer.milvus_lite import serve

    return serve(s)


def cmd_demo(args: argparse.Namespace, s: Settings) -> int:
    """The main job end to end on embedded defaults."""
    from producer.demo import run_demo
    from worker.model import resolve_checkpoint

    # Here, not in the demo: the CLI is the one place that imports both sides. Fails in seconds, before any
    # service is started, when the model is neither local nor downloadable.
    folder = resolve_checkpoint(s.model)
    return run_demo(s, args.collection, replica=(folder / "m3q_replica.json").exists())


if __name__ == "__main__":
    sys.exit(main())
