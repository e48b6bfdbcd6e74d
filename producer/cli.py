"""The ``m3q`` command line. Every setting is an ``M3Q_*`` variable and also a ``--flag`` of each command."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import fields
from typing import Any, Iterator, Sequence

from producer.settings import Settings

log = logging.getLogger("m3q")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``m3q``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.command in ("worker", "demo", "milvus") else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # pymilvus logs a traceback for errors that m3q already reports in one clear line.
    logging.getLogger("pymilvus").setLevel(logging.CRITICAL)
    try:
        settings = Settings.from_env(**{f.name: getattr(args, f.name, None) for f in fields(Settings)})
        return int(args.run(args, settings) or 0)
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # noqa: BLE001 - one clear line instead of a traceback for expected failures
        if _expected(e):
            print(f"m3q {args.command}: {e}", file=sys.stderr)
            return 2
        raise


def _expected(e: Exception) -> bool:
    names = {"ModelLoadError", "DeviceError", "PayloadError", "JobFailed", "JobTimeout", "MilvusError",
             "SchemaMismatch", "FileNotFoundError", "ValueError", "ConnectionError", "InfraError"}
    return type(e).__name__ in names or any(c.__name__ in names for c in type(e).__mro__)


def build_parser() -> argparse.ArgumentParser:
    """All sub-commands, each with every setting as a flag."""
    parser = argparse.ArgumentParser(prog="m3q", description="BGE-M3 embeddings on a Celery + Redis queue, into Milvus.")
    sub = parser.add_subparsers(dest="command", required=True)
    settings_flags = argparse.ArgumentParser(add_help=False)
    group = settings_flags.add_argument_group("settings (each also an M3Q_* environment variable)")
    for f in fields(Settings):
        kind = {"int": int, "float": float, "bool": _bool}.get(str(f.type), str)
        group.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=kind, default=None,
                           help=f.metadata["doc"], metavar=f.name.upper())

    def command(name: str, run, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, parents=[settings_flags], help=help, description=help)
        p.set_defaults(run=run)
        return p

    p = command("worker", cmd_worker, "Run a worker pinned to one device (loads the model before taking jobs).")
    p.add_argument("--queues", help="Comma-separated queues to consume (default: queries, documents, this device's queue)")
    p.add_argument("--hostname", help="Celery node name (default m3q-DEVICE-PID@host)")
    p.add_argument("--loglevel", default="INFO")

    p = command("encode", cmd_encode, "Encode JSONL from stdin ({'text', 'id'} per line) to JSONL on stdout.")
    p.add_argument("--local", action="store_true", help="Encode in this process instead of through the queue")
    p.add_argument("--kind", choices=["documents", "queries"], default="documents")
    p.add_argument("--colbert", action="store_true", help="Also output ColBERT vectors")
    p.add_argument("--route-device", help="Send the jobs to this device's queue only")

    p = command("index", cmd_index, "Index a JSONL, CSV, Parquet or text file into a Milvus collection.")
    p.add_argument("file")
    p.add_argument("--collection", required=True)
    p.add_argument("--text-field", default="text")
    p.add_argument("--id-field", default="id")

    p = command("search", cmd_search, "Search a collection with a query encoded by the workers.")
    p.add_argument("text")
    p.add_argument("--collection", required=True)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--mode", choices=["hybrid", "dense", "sparse"], default="hybrid")

    command("status", cmd_status, "Live workers (device, model, dtype, rate), queue depths, failed jobs.")
    p = command("replica", cmd_replica, "Write a random-weight checkpoint in BGE-M3's format (tests, capacity planning).")
    p.add_argument("dir")
    p.add_argument("--size", choices=["tiny", "small", "base", "large"], default="small")
    p.add_argument("--seed", type=int, default=0)

    p = command("reindex", cmd_reindex, "Re-index a file or milvus:COLLECTION into a new collection behind an "
                "alias, resumably; the alias switches when every document is in.")
    p.add_argument("--from", dest="source", help="File (JSONL, CSV, Parquet) or milvus:COLLECTION")
    p.add_argument("--into", dest="alias", help="Alias to switch; the data goes into ALIAS_vN")
    p.add_argument("--resume", metavar="JOB", help="Go on with a re-index job (skips stored batches)")
    p.add_argument("--job-id", help="Id of a new job (default: random)")
    p.add_argument("--allow-rejects", action="store_true", default=None, help="Switch even if rows were rejected")
    p.add_argument("--rate-limit", type=float, metavar="DOCS_PER_S", help="Send at most this many documents/s")
    p.add_argument("--drop-old", action="store_true", default=None,
                   help="Drop the collection the alias leaves; alone with --into: drop every unaliased ALIAS_vN")
    p.add_argument("--text-field", default="text")
    p.add_argument("--id-field", default="id")
    p.add_argument("--no-progress", action="store_true", help="No progress bar")

    command("milvus", cmd_milvus, "Run the embedded Milvus Lite server (for several workers on one machine).")
    p = command("demo", cmd_demo, "The whole job end to end on embedded defaults: index a sample corpus, search it.")
    p.add_argument("--collection", default="m3q_demo")
    return parser


def _bool(raw: str) -> bool:
    if raw.lower() in ("1", "true", "yes", "on"):
        return True
    if raw.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"{raw!r} is not a boolean")


# ---- worker ---------------------------------------------------------------------------------------------

def cmd_worker(args: argparse.Namespace, s: Settings) -> int:
    """Run a Celery worker with the threads pool, consuming the lanes and the device queue."""
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
    encode = _local_encoder(s, args) if args.local else _remote_encoder(s, args)
    truncated = 0
    from producer.client import chunked

    for chunk in chunked(_read_jsonl(sys.stdin), 1024):
        good = [i for i, (_, _, error) in enumerate(chunk) if error is None]
        items, n = encode([chunk[i][1] for i in good]) if good else ([], 0)
        by_line = dict(zip(good, items))
        truncated += n
        for i, (doc_id, _, error) in enumerate(chunk):
            line = _item_json(doc_id, error, by_line.get(i), args.colbert)
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


def _read_jsonl(stream) -> Iterator[tuple[Any, Any, str | None]]:
    """(id, text, error) per input line; a bad line keeps its place with an error."""
    for n, line in enumerate(stream, 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            yield None, None, f"line {n} is not JSON: {e.msg}"
            continue
        if not isinstance(row, dict) or "text" not in row:
            yield (row.get("id") if isinstance(row, dict) else None), None, f"line {n} has no 'text' field"
            continue
        yield row.get("id"), row["text"], None


def _item_json(doc_id: Any, error: str | None, item: Any, colbert: bool) -> dict:
    from producer.wire import ItemError

    if error or isinstance(item, ItemError):
        return {"id": doc_id, "error": error or item.reason}
    out: dict[str, Any] = {"id": doc_id, "dense": item.dense.tolist(),
                           "sparse": {str(k): v for k, v in item.sparse_dict().items()}}
    if colbert:
        out["colbert"] = item.colbert.tolist()
    return out


# ---- index, search, status ------------------------------------------------------------------------------

def cmd_index(args: argparse.Namespace, s: Settings) -> int:
    """Index a file through the queue, with a progress bar and a summary."""
    from producer.indexing import index_file

    report = index_file(s, args.file, args.collection, args.text_field, args.id_field)
    print(report.summary())
    return 0 if report.stored or not (report.rejected or report.source_errors) else 1


def cmd_search(args: argparse.Namespace, s: Settings) -> int:
    """Print ranked hits: rank, score, id and a snippet."""
    from producer.search import search

    hits = search(args.text, args.collection, mode=args.mode, k=args.k, settings=s)
    if not hits:
        print("no hits")
    for rank, hit in enumerate(hits, 1):
        snippet = " ".join(str(hit.text).split())[:100]
        print(f"{rank:>3}. {hit.score:8.4f}  {hit.id}  {snippet}")
    return 0


def cmd_status(args: argparse.Namespace, s: Settings) -> int:
    """Workers, queues, failed jobs and re-index jobs."""
    from producer.status import collect, render

    print(render(collect(s)))
    return 0


def cmd_reindex(args: argparse.Namespace, s: Settings) -> int:
    """Start or resume a re-index, or drop the collections an alias left behind."""
    from producer import reindex

    if args.resume:
        report = reindex.resume_reindex(s, args.resume, allow_rejects=args.allow_rejects,
                                        rate_limit_docs_s=args.rate_limit, drop_old=args.drop_old,
                                        progress=not args.no_progress)
    elif args.source and args.alias:
        report = reindex.start_reindex(s, args.source, args.alias, allow_rejects=bool(args.allow_rejects),
                                       rate_limit_docs_s=args.rate_limit, drop_old=bool(args.drop_old),
                                       job_id=args.job_id, progress=not args.no_progress,
                                       text_field=args.text_field, id_field=args.id_field)
    elif args.drop_old and args.alias:
        dropped = reindex.drop_unaliased(s, args.alias)
        print("\n".join(f"dropped {name}" for name in dropped) or "nothing to drop")
        return 0
    else:
        raise ValueError("use --from SOURCE --into NAME, --resume JOB, or --drop-old --into NAME")
    print(report.summary())
    return 0 if report.switched else 1


def cmd_replica(args: argparse.Namespace, s: Settings) -> int:
    """Write a random-weight replica checkpoint."""
    from worker.replica import write_replica

    path = write_replica(args.dir, args.size, args.seed)
    print(f"wrote a RANDOM-WEIGHT {args.size} replica to {path}; use it with M3Q_MODEL={path}")
    return 0


def cmd_milvus(args: argparse.Namespace, s: Settings) -> int:
    """Run Milvus Lite in the foreground."""
    from producer.milvus_lite import start_lite_server

    server = start_lite_server(s.milvus_data_dir, s.milvus_port)
    print(f"Milvus Lite serving http://127.0.0.1:{s.milvus_port} (data in {s.milvus_data_dir}); Ctrl-C stops it")
    try:
        return server.wait()
    finally:
        server.terminate()


def cmd_demo(args: argparse.Namespace, s: Settings) -> int:
    """The main job end to end on embedded defaults."""
    from producer.demo import run_demo

    return run_demo(s, args.collection)


if __name__ == "__main__":
    sys.exit(main())
