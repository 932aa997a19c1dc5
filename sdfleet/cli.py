"""The ``sdfleet`` command line: one command, a subcommand per role.

Exit codes: 0 success; 1 a job failed or a runtime error; 2 a usage error (bad flag, bad input file,
unknown batch, bad setting). Settings come from the environment (REDIS_URL, SDFLEET_*), read here only.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from sdfleet import logs
from sdfleet.errors import ConfigError, InvalidJob, SdfleetError
from sdfleet.settings import Settings

EPILOG = """\
examples:
  sdfleet demo                                   run the tiny model on the CPU end to end
  sdfleet worker --device cuda:0 --model /models/sd3.5-large --max-batch 4
  sdfleet submit prompts.jsonl --batch catalogue --out s3://images/catalogue --wait
  sdfleet submit prompts.txt --width 768 --height 768 --steps 28 --guidance 4.5
  sdfleet status catalogue --json
  sdfleet wait catalogue && sdfleet results catalogue -o manifest.jsonl
  sdfleet cancel catalogue
  sdfleet make-model medium /models/sd3.5-medium-random   SD3.5 layout, random weights, no download

environment: REDIS_URL (default redis://127.0.0.1:6379/0), SDFLEET_OUT, SDFLEET_S3_ENDPOINT_URL,
  SDFLEET_WEBHOOK_SECRET, SDFLEET_LOG_FORMAT (auto|json|console), SDFLEET_VISIBILITY_TIMEOUT, ...
exit codes: 0 ok; 1 some jobs failed / runtime error; 2 usage error (bad flags, invalid file, unknown batch);
  3 wait --timeout passed with jobs still queued or running; 130 Ctrl-C
"""


#: ``sdfleet wait --timeout`` ended with jobs still queued or running
EXIT_NOT_DONE = 3


class _Parser(argparse.ArgumentParser):
    def add_argument(self, *args: Any, **kwargs: Any) -> Any:
        # --help shows every default: appended to each option's help unless the help already names it.
        default, text = kwargs.get("default"), kwargs.get("help")
        if (args and str(args[0]).startswith("-") and text is not argparse.SUPPRESS
                and default not in (None, False, [], argparse.SUPPRESS) and "default" not in (text or "")):
            kwargs["help"] = f"{text} (default: %(default)s)" if text else "(default: %(default)s)"
        return super().add_argument(*args, **kwargs)

    def error(self, message: str) -> None:  # argparse exits 2 already; keep the message short and clear
        self.print_usage(sys.stderr)
        print(f"sdfleet: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="sdfleet", description="Queued SD3.5 image generation on a fleet of GPU workers.",
                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"sdfleet {_version()}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    from sdfleet.jobs import JobSpec

    d = {name: f.default for name, f in JobSpec.model_fields.items()}
    s = sub.add_parser("submit", help="submit a JSONL or plain-text file of jobs",
                       description="Submit FILE: JSONL (one job object a line; its fields override the flags) "
                                   "or plain text (one prompt a line, custom_id line-000042 for line 42). "
                                   "Prints the batch id. All or nothing: a submission that fails or is killed "
                                   "records nothing that will run.")
    s.add_argument("file", help="the job file; '-' reads standard input")
    s.add_argument("--width", type=int, help=f"image width (default: {d['width']})")
    s.add_argument("--height", type=int, help=f"image height (default: {d['height']})")
    s.add_argument("--steps", type=int, help=f"denoising steps (default: {d['steps']})")
    s.add_argument("--guidance", type=float, dest="guidance_scale", help=f"guidance scale (default: {d['guidance_scale']})")
    s.add_argument("--seed", type=int, help="seed for every job (default: a random one per job, recorded)")
    s.add_argument("--negative-prompt", dest="negative_prompt", help="negative prompt (default: none)")
    s.add_argument("--model", help="the model name or directory the worker was given, e.g. large or "
                                   "/models/sd3.5-large; the queue is sdfleet.gen.<lower-cased basename> "
                                   f"(default: {d['model']})")
    s.add_argument("--out", help="file://DIR or s3://bucket/prefix (default: SDFLEET_OUT or file://./outputs)")
    s.add_argument("--batch", help="batch name; resubmitting under the same name skips jobs already done "
                                   "(default: a new name, printed)")
    s.add_argument("--replace", action="store_true",
                   help="run again, with the new parameters, jobs whose custom_id is in the batch already with "
                        "other parameters (default: such a resubmission is refused, listing them)")
    s.add_argument("--url-style", default="s3", choices=["s3", "https", "presigned"],
                   help="URLs in the manifest and webhooks: s3://, the object's https:// address, or presigned "
                        "https:// valid for --url-ttl")
    s.add_argument("--url-ttl", type=int, default=7 * 24 * 3600, help="seconds a presigned URL stays valid")
    s.add_argument("--webhook", help="http(s) URL notified when each job and the batch end (default: none)")
    s.add_argument("--webhook-events", help="comma list of job.succeeded,job.failed,job.cancelled,"
                                            "batch.completed (default: all)")
    s.add_argument("--webhook-secret", help=argparse.SUPPRESS)  # refused with a pointer (secrets stay out of Redis)
    s.add_argument("--skip-invalid", action="store_true", help="submit the valid lines, report the rest")
    s.add_argument("--wait", action="store_true", help="wait for the batch with a progress bar")

    for name, helptext in (("status", "show a batch's progress"), ("wait", "wait for a batch with a progress bar"),
                           ("cancel", "cancel a batch's queued jobs")):
        c = sub.add_parser(name, help=helptext)
        c.add_argument("batch")
        if name == "status":
            c.add_argument("--json", action="store_true")
        if name == "wait":
            c.add_argument("--timeout", type=float, default=None,
                           help="give up after this many seconds (exit 3, not 1: the batch is not over), saying "
                                "what is still queued and running (default: wait until every job has ended)")
    r = sub.add_parser("results", help="write the manifest of a batch (one JSON line per job)")
    r.add_argument("batch")
    r.add_argument("-o", "--output", help="manifest file (default: stdout)")
    r.add_argument("--url-style", choices=["s3", "https", "presigned"],
                   help="URL style (default: the one the batch was submitted with)")

    w = sub.add_parser("worker", help="run one worker process owning one device")
    w.add_argument("--device", default="cpu", help="cuda:N or cpu")
    w.add_argument("--model", default="tiny",
                   help="tiny (a small test model), null (no model: queue tests), or a local SD3.5 diffusers "
                        "directory (its name names the queue; sdfleet make-model writes random-weight ones)")
    w.add_argument("--max-batch", type=int, default=4)
    w.add_argument("--max-wait-ms", type=float, default=50.0,
                   help="how long a partial batch waits for more jobs of its shape while the engine is free "
                        "(while it is busy, a partial batch keeps filling for up to two of its shape's runs)")
    w.add_argument("--precision", default="auto", choices=["auto", "fp8", "bf16", "fp32"])
    w.add_argument("--fp8-weights", help="directory written by 'sdfleet quantize' (cold start without re-quantizing)")
    w.add_argument("--fp8-text-encoder", action="store_true",
                   help="T5-XXL's linears in FP8 too (with --precision fp8 or auto on an FP8 GPU): about 4.5 GiB "
                        "less GPU memory, so SD3.5 Large fits a 24 GB card; CLIP stays BF16")
    w.add_argument("--channels-last-vae", action="store_true",
                   help="VAE in channels_last: 0.6 GiB less at the decode's peak (1024 px), same pixels, ~2%% "
                        "slower per image; with --fp8-text-encoder for 24 GB cards")
    w.add_argument("--no-text-encoder-graphs", action="store_true",
                   help="run the text encoders eagerly instead of replaying the CUDA graphs captured at boot "
                        "(about 0.14 s more per batch on an H200; a graph costs some memory per prompt bucket)")
    w.add_argument("--worker-id")
    w.add_argument("--warmup", action="append", default=[], metavar="WxH:STEPS",
                   help="shape to run once at boot, e.g. 1024x1024:28 (repeatable)")
    w.add_argument("--post-threads", type=int, default=2,
                   help="engine runs stored and recorded at once (default 2)")
    # One switch per speed-up, so each one's effect can be measured alone (all on by default).
    for name in ("fp8-linears", "fused-quant", "fp8-attention", "adaln-all-steps", "cuda-graphs"):
        w.add_argument(f"--no-{name}", action="store_true", help=f"turn off {name.replace('-', ' ')}")
    w.add_argument("--fp8-attention-kernel", choices=("triton", "gluon"), default=None,
                   help="FP8 attention kernel of the joint attention (default triton); gluon: a software-pipelined "
                        "kernel for Hopper, head_dim 64, measured 3-4%% slower on an H200 (the Triton kernel runs "
                        "where it cannot; no effect with --no-fp8-attention, --no-fused-quant or bf16)")
    # Test hooks for the null engine (queue benchmarks, crash-safety tests); hidden from --help.
    w.add_argument("--null-delay-ms", type=float, default=0.0, help=argparse.SUPPRESS)
    w.add_argument("--null-crash-prompt", default=None, help=argparse.SUPPRESS)
    w.add_argument("--null-hang-prompt", default=None, help=argparse.SUPPRESS)
    w.add_argument("--metrics-port", type=int, default=None,
                   help="serve Prometheus /metrics on this port (0: a free one; default: none)")
    w.add_argument("--no-overlap", action="store_true",
                   help="run, copy and store one batch at a time (to measure what the overlap is worth)")
    w.add_argument("--timeline", default=None, metavar="FILE",
                   help="append one JSON line per engine run (engine, copy, store, ack times) to FILE")

    hc = sub.add_parser("health", help="liveness check of a worker (exit 0 alive, 1 stalled or silent)",
                        description="Reads the worker's liveness file (SDFLEET_HEALTH_FILE or --file): exit 1 "
                                    "when the worker reports 'stalled' or has not written it for --max-age-s.")
    hc.add_argument("--file", default=None, help="liveness file (default: SDFLEET_HEALTH_FILE)")
    hc.add_argument("--max-age-s", type=float, default=30.0, help="older than this counts as silent (default 30)")

    q = sub.add_parser("quantize", help="write the FP8 transformer (weights + scales) for fast cold starts",
                       description="Quantize SRC's transformer to FP8 and write DST (safetensors + JSON). SRC: a "
                                   "local diffusers SD3.5 directory, 'tiny', or 'medium'/'large' (random weights).")
    q.add_argument("src")
    q.add_argument("dst")
    q.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    q.add_argument("--keep-bf16", default=None, metavar="TYPES",
                   help="comma list of layer types kept in BF16 (default: embedders, norm_out, proj_out)")

    mm = sub.add_parser("make-model", help="write an SD3.5 model directory with random weights (no download)",
                        description="Write the full diffusers layout of SD3.5 Medium or Large (or the tiny test "
                                    "model) to DIR from the released configs, with random weights: a directory "
                                    "'sdfleet worker --model DIR' and 'sdfleet quantize DIR OUT' load like a "
                                    "download. A complete DIR is kept (use --overwrite to write it again).")
    mm.add_argument("name", choices=["tiny", "medium", "large"])
    mm.add_argument("dir")
    mm.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"],
                    help="dtype of the weights written (default: bf16)")
    mm.add_argument("--device", default="cpu",
                    help="where the random weights are made: cpu or cuda, much faster (default: cpu)")
    mm.add_argument("--overwrite", action="store_true")
    mm.add_argument("--seed", type=int, default=0)

    j = sub.add_parser("janitor", help="reclaim the work of dead workers (run one per fleet)")
    j.add_argument("--interval", type=float, default=2.0, help="seconds between sweeps")
    j.add_argument("--once", action="store_true", help="one sweep, then exit")

    d = sub.add_parser("demo", help="run the whole fleet on this machine with the tiny model on the CPU")
    d.add_argument("--out", default="file://./outputs/demo")
    d.add_argument("--size", type=int, default=256)
    d.add_argument("--steps", type=int, default=8)
    _add_webhook_parsers(sub)
    _add_fleet_parsers(sub)
    return p


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sdfleet")
    except PackageNotFoundError:
        from sdfleet import __version__

        return __version__


_PRODUCER_COMMANDS = frozenset({"submit", "status", "wait", "results", "cancel"})


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = None
    try:
        settings = Settings.from_env()
        # The producer's commands talk to a person in their own lines; the library's info logs (a cancel's
        # "jobs cancelled", a batch's completion) only repeat them there. Services keep the configured level.
        quiet = args.command in _PRODUCER_COMMANDS and "SDFLEET_LOG_LEVEL" not in os.environ
        logs.configure(settings.log_format, "warning" if quiet else settings.log_level)
        return COMMANDS[args.command](args, settings)
    except SdfleetError as exc:
        print(f"sdfleet: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return _closed_stdout()
    except Exception as exc:
        # Redis going away mid-command (after the first check passed): one line, not a traceback.
        if _is_connection_error(exc) and settings is not None:
            from sdfleet.settings import redis_address

            print(f"sdfleet: lost Redis at {redis_address(settings.redis_url)} (REDIS_URL): "
                  f"{' '.join(str(exc).split())[:200]}; check that it is running", file=sys.stderr)
            return 1
        raise


def _closed_stdout() -> int:
    # The reader went away (``sdfleet results X | head``): nothing left to say and no one to say it to.
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    return 0


def _is_connection_error(exc: BaseException) -> bool:
    import redis
    from kombu.exceptions import OperationalError

    return isinstance(exc, (redis.ConnectionError, redis.TimeoutError, OperationalError, ConnectionError))


# --- producer commands ------------------------------------------------------------------------------

def _services(settings: Settings):
    from sdfleet.queue import make_app
    from sdfleet.redisconn import check_reachable, connect
    from sdfleet.state import JobStore

    check_reachable(settings.redis_url)  # one line naming REDIS_URL, instead of half a minute of retries

    return JobStore(connect(settings.redis_url)), make_app(settings)


def cmd_submit(args: argparse.Namespace, settings: Settings) -> int:
    from producer.reader import read_file
    from producer.status import unserved
    from producer.submit import check_batch_name, new_batch_id, submit
    from sdfleet.errors import InvalidFile
    from sdfleet.storage import StorageFactory, check_location

    if args.webhook_secret:
        # Secrets stay out of Redis: a per-batch secret would have to be stored where anyone who reads Redis
        # could forge webhooks with it, and a rotation could never reach the batches that carry it.
        raise ConfigError("--webhook-secret is not accepted: webhooks are signed by the webhook worker with "
                          "its own SDFLEET_WEBHOOK_SECRET (and SDFLEET_WEBHOOK_PREVIOUS_SECRETS while rotating); "
                          "set it there and leave the flag out")
    defaults: dict[str, Any] = {k: getattr(args, k) for k in
                                ("width", "height", "steps", "guidance_scale", "seed", "negative_prompt", "model",
                                 "webhook") if getattr(args, k) is not None}
    if args.webhook_events:
        defaults["webhook_events"] = tuple(e.strip() for e in args.webhook_events.split(",") if e.strip())
    # Flags are validated like a job, so a bad flag is reported once and by name.
    from sdfleet.jobs import parse_job

    try:
        parse_job({"prompt": "flag check"}, defaults=defaults)
    except InvalidJob as exc:
        flag = "--" + (exc.field or "").replace("_scale", "").replace("_", "-")
        raise InvalidJob(exc.reason, field=flag) from None
    out = args.out or settings.out
    try:
        check_location(out)
    except SdfleetError as exc:
        raise InvalidJob(str(exc), field="--out" if args.out else "SDFLEET_OUT") from None
    if args.url_ttl < 1 or args.url_ttl > 7 * 24 * 3600:
        raise InvalidJob("use 1 to 604800 seconds (S3 presigns for at most 7 days)", field="--url-ttl")
    try:
        result = read_file(args.file, defaults)
    except KeyboardInterrupt:
        print(f"sdfleet: interrupted while reading {'standard input' if args.file == '-' else args.file}: "
              "nothing was submitted", file=sys.stderr)
        return 130
    _check_webhook_urls(result, defaults, settings)  # URL policy: http(s), no private addresses
    name = "standard input" if args.file == "-" else args.file
    if result.errors and not args.skip_invalid:
        raise InvalidFile(name, result.errors)
    for err in result.errors:
        print(f"skipped {err}", file=sys.stderr)
    if not result.jobs:
        raise InvalidJob(f"{name} holds no jobs; nothing was enqueued")
    store, app = _services(settings)
    # The id is chosen here, not inside submit(), so that a Ctrl-C at any point can say what became of it.
    batch_id = check_batch_name(args.batch) if args.batch else new_batch_id()
    existed = bool(args.batch) and store.batch_exists(batch_id)
    try:
        res = submit([spec for _, spec in result.jobs], store=store, app=app,
                     storage=StorageFactory(settings.s3_endpoint_url, settings.s3_region, settings.upload_retries),
                     default_out=out, batch_name=batch_id, replace=args.replace,
                     webhook_secret=settings.webhook_secret, url_style=args.url_style, url_ttl_s=args.url_ttl,
                     lease_s=settings.submission_lease_s)
        print(res.batch_id)
    except KeyboardInterrupt:
        return _interrupted_submission(store, batch_id, existed=existed)
    replaced = f", {res.replaced} replaced" if res.replaced else ""
    print(f"{res.enqueued} enqueued{replaced}, {res.skipped_done} already done, {res.skipped_pending} already "
          f"pending ({res.total} in batch)", file=sys.stderr)
    for queue in unserved(store, res.queues):
        print(f"sdfleet: warning: no live worker serves queue {queue}; its jobs wait until one starts "
              f"(sdfleet worker --model {queue.removeprefix('sdfleet.gen.')} or the model's directory)",
              file=sys.stderr)
    if args.wait:
        return _wait(store, res.batch_id, None)
    return 0


def _interrupted_submission(store: Any, batch_id: str, *, existed: bool) -> int:
    """Ctrl-C during ``submit``: say what became of the batch, exit 130. A new batch either committed (its jobs
    are queued and run) or is not recorded at all (its staged jobs expire with the lease). For a batch that
    existed before, whether this submission's jobs were added cannot be told from here."""
    if existed:
        print(f"sdfleet: interrupted; batch {batch_id} existed before this submission: whether its jobs were "
              f"added shows in sdfleet status {batch_id}", file=sys.stderr)
        return 130
    try:
        # The interrupt may have landed between a command's send and its reply: that connection went back to
        # the pool with the reply unread, and the next command on it would read it as its own (seen: a stale
        # 1 taken for "the batch exists"). Ask on fresh connections.
        store.r.connection_pool.disconnect()
        committed = store.batch_exists(batch_id)
    except Exception as exc:  # Redis gone as well: say what is known
        print(f"sdfleet: interrupted; whether batch {batch_id} was committed is unknown ({type(exc).__name__}): "
              f"sdfleet status {batch_id} tells", file=sys.stderr)
        return 130
    if committed:
        print(batch_id)  # stdout as after a finished submit: the batch exists
        print(f"sdfleet: interrupted after batch {batch_id} was committed: its jobs are queued and will run "
              f"(sdfleet wait {batch_id} follows them; sdfleet cancel {batch_id} stops them)", file=sys.stderr)
    else:
        print(f"sdfleet: interrupted before batch {batch_id} was committed: nothing was recorded",
              file=sys.stderr)
    return 130


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    from producer.status import batch_status

    store, _ = _services(settings)
    st = batch_status(store, args.batch)
    if args.json:
        print(json.dumps(st, indent=1))
    elif st.get("submitting") and not st["total"]:
        print(f"batch {st['batch_id']}: submission in progress (nothing is recorded until it commits)")
    else:
        c = st["counts"]
        state = "complete" if st["complete"] else "in progress"
        print(f"batch {st['batch_id']}: {state}, {st['total']} jobs: " +
              ", ".join(f"{c[s]} {s}" for s in ("queued", "running", "storing", "succeeded", "failed", "cancelled")))
    return 0


def cmd_wait(args: argparse.Namespace, settings: Settings) -> int:
    if args.timeout is not None and not args.timeout >= 0:
        raise ConfigError("--timeout must be a number of seconds >= 0")
    store, _ = _services(settings)
    return _wait(store, args.batch, args.timeout)


class _CtrlC:
    """While open, the first Ctrl-C (SIGINT) only sets ``hit``; a second one interrupts as usual.

    A KeyboardInterrupt raised at an arbitrary point of the wait loop can land inside the progress bar's
    locks or its refresh thread's join, and then the bar's own clean-up waits forever (seen: ``submit --wait``
    still running 30 s after Ctrl-C). With the flag, the loop notices at its next poll (0.25 s), stops the bar
    itself and says where the batch stands. The handler only sets an attribute and arms a timer: a signal
    handler must not take a lock the interrupted code may hold.

    A poll can be stuck where the flag is never read: Redis gone (the client retries with backoff for ~30 s)
    or hung (no socket timeout). So if the wait has not ended ``grace_s`` after the first Ctrl-C, the timer
    delivers a second SIGINT to the main thread, which interrupts the blocked call like a second Ctrl-C.
    A SIGINT that was ignored when the context opened (``nohup``, a script's ``cmd &``) stays ignored.
    The timer signals only under ``_lock`` and only before the context starts closing, and a signal that
    arrives while it closes is dropped, so a wait that ends as the timer fires is not interrupted after it.
    """

    def __init__(self, grace_s: float = 2.0) -> None:
        import threading

        self.hit = False
        self.grace_s = grace_s
        self._old: Any = None
        self._installed = False
        self._closing = False
        self._lock = threading.Lock()
        self._timer: Any = None

    def _handle(self, signum: int, frame: Any) -> None:
        if self.hit:
            if self._closing:  # the wait has ended: nothing is left to interrupt
                return
            raise KeyboardInterrupt
        self.hit = True
        import threading

        self._timer = threading.Timer(self.grace_s, self._interrupt_main)
        self._timer.daemon = True
        self._timer.start()

    def _interrupt_main(self) -> None:
        import signal
        import threading

        with self._lock:
            if self._installed and not self._closing:  # the wait did not notice the flag in time
                signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)

    def __enter__(self) -> _CtrlC:
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():  # only the main thread may set handlers
            if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
                self._old = signal.signal(signal.SIGINT, self._handle)
                self._installed = True
        return self

    def __exit__(self, *exc: Any) -> None:
        import signal

        if self._installed:
            self._closing = True
            with self._lock:  # a timer past its check has signalled by now; any later one sees _closing
                self._installed = False
            if self._timer is not None:
                self._timer.cancel()
            signal.signal(signal.SIGINT, self._old)


def _wait(store: Any, batch_id: str, timeout: float | None) -> int:
    from producer.status import describe, wait_for_batch

    stopped = f"sdfleet: stopped waiting; the batch goes on (sdfleet wait {batch_id} follows it again)"
    try:
        with _CtrlC() as ctrl_c:
            st = wait_for_batch(store, batch_id, timeout=timeout, progress=True, stop=lambda: ctrl_c.hit)
    except Exception as exc:
        # Ctrl-C while a poll was stuck (Redis gone or hung): the poll's error, or the timer's interrupt,
        # ends the wait; what the batch does is unknown here, and it goes on regardless.
        if not ctrl_c.hit:
            raise
        print(f"{stopped}; its status could not be read ({type(exc).__name__})", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        if not ctrl_c.hit:
            raise
        print(f"{stopped}; its status could not be read in time", file=sys.stderr)
        return 130
    c = st["counts"]
    print(describe(st, st.get("idle_queues", ())), file=sys.stderr)
    if ctrl_c.hit and not st["complete"]:  # (a batch that ended during the last poll is reported as ended)
        print(stopped, file=sys.stderr)
        return 130
    if not st["complete"]:
        return EXIT_NOT_DONE  # the timeout passed: a script can tell "not over yet" from "over, some failed"
    return 0 if c["succeeded"] == st["total"] else 1


def cmd_results(args: argparse.Namespace, settings: Settings) -> int:
    from producer.status import manifest_lines
    from sdfleet.errors import StorageError
    from sdfleet.events import url_style_of
    from sdfleet.storage import StorageFactory

    store, _ = _services(settings)
    style, ttl = url_style_of(store.r, args.batch)
    storage = StorageFactory(settings.s3_endpoint_url, settings.s3_region, settings.upload_retries)
    try:
        lines = manifest_lines(store, args.batch,
                               public_url=lambda u: storage.public_url(u, args.url_style or style, ttl))
    except StorageError as exc:  # presigning without credentials: a usage error, with the alternatives
        raise ConfigError(f"--url-style: {exc}") from None
    text = "".join(json.dumps(line) + "\n" for line in lines)
    if args.output:
        try:
            Path(args.output).write_text(text)
        except OSError as exc:
            raise ConfigError(f"-o {args.output}: cannot write there ({exc.strerror}); choose a writable path") \
                from None
        print(f"{len(lines)} lines written to {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(text)
        sys.stdout.flush()
    return 0


def cmd_cancel(args: argparse.Namespace, settings: Settings) -> int:
    from sdfleet.cancel import cancel_batch

    store, app = _services(settings)
    n = cancel_batch(settings, store, app, args.batch)
    print(f"{n} queued job(s) cancelled and revoked; running jobs finish", file=sys.stderr)
    return 0


# --- worker and demo --------------------------------------------------------------------------------

def parse_shape(text: str, model: str) -> Any:
    from sdfleet.jobs import parse_job

    try:
        size, steps = text.split(":") if ":" in text else (text, "28")
        w, h = (int(x) for x in size.lower().split("x"))
        return parse_job({"prompt": "warmup", "width": w, "height": h, "steps": int(steps), "model": "tiny"}).key
    except (ValueError, InvalidJob) as exc:
        raise ConfigError(f"--warmup {text!r}: expected WxH:STEPS such as 1024x1024:28 ({exc})") from None


def cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    from worker.app import WorkerOptions, run_worker

    if args.max_batch < 1 or args.max_batch > 64:
        raise ConfigError("--max-batch must be 1..64")
    if args.max_wait_ms < 0:
        raise ConfigError("--max-wait-ms must be >= 0")
    if not (args.device == "cpu" or args.device.startswith("cuda")):
        raise ConfigError(f"--device {args.device!r}: use cpu or cuda:N")
    extra: dict[str, Any] = {"null_delay_s": args.null_delay_ms / 1000.0, "null_crash_prompt": args.null_crash_prompt,
                             "null_hang_prompt": args.null_hang_prompt}
    if args.fp8_weights:
        extra["fp8_weights"] = args.fp8_weights
    switches = {name: False for name in ("fp8_linears", "fused_quant", "fp8_attention", "adaln_all_steps")
                if getattr(args, f"no_{name}")}
    if args.fp8_attention_kernel:
        switches["attention_kernel"] = args.fp8_attention_kernel
    if switches:
        extra["fp8_switches"] = switches
    if args.no_cuda_graphs:
        extra["cuda_graphs"] = False
    if args.no_text_encoder_graphs:
        extra["text_encoder_graphs"] = False
    if args.fp8_text_encoder:
        extra["fp8_text_encoder"] = True
    if args.channels_last_vae:
        extra["channels_last_vae"] = True
    if args.no_overlap:
        extra["async_copy"] = False
    opts = WorkerOptions(model=args.model, device=args.device, precision=args.precision, max_batch=args.max_batch,
                         max_wait_ms=args.max_wait_ms, worker_id=args.worker_id or "",
                         post_threads=args.post_threads, engine_extra=extra,
                         warmup=tuple(parse_shape(w, args.model) for w in args.warmup),
                         metrics_port=args.metrics_port if args.metrics_port is not None else settings.metrics_port,
                         timeline=args.timeline, overlap=not args.no_overlap)
    return run_worker(settings, opts)


def cmd_health(args: argparse.Namespace, settings: Settings) -> int:
    path = args.file or settings.health_file
    if not path:
        raise ConfigError("sdfleet health: give --file or set SDFLEET_HEALTH_FILE (the worker writes it)")
    try:
        with open(path) as f:
            state = json.load(f)
    except (OSError, ValueError) as exc:
        print(f"unhealthy: cannot read {path}: {exc}", file=sys.stderr)
        return 1
    age = time.time() - float(state.get("last_beat", 0))
    if state.get("state") == "stalled" or age > args.max_age_s:
        print(f"unhealthy: worker {state.get('worker_id')} {state.get('state')}, last beat {age:.1f} s ago",
              file=sys.stderr)
        return 1
    print(f"ok: worker {state.get('worker_id')} {state.get('state')}, last beat {age:.1f} s ago")
    return 0


def cmd_quantize(args: argparse.Namespace, settings: Settings) -> int:
    from worker.engine.fp8 import Fp8Options
    from worker.engine.fp8.serialize import quantize

    options = Fp8Options()
    if args.keep_bf16 is not None:
        options = Fp8Options.from_dict({**options.to_dict(),
                                        "bf16_layers": [t.strip() for t in args.keep_bf16.split(",") if t.strip()]})
    summary = quantize(args.src, args.dst, options=options, device=args.device)
    print(json.dumps(summary, indent=1, default=str))
    return 0


def cmd_make_model(args: argparse.Namespace, settings: Settings) -> int:
    import torch

    from worker.engine.model_dir import write_model_dir

    if not (args.device == "cpu" or args.device.startswith("cuda")):
        raise ConfigError(f"--device {args.device!r}: use cpu or cuda")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device here; use --device cpu")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    summary = write_model_dir(args.name, args.dir, dtype=dtype, device=args.device, seed=args.seed,
                              overwrite=args.overwrite, log=lambda m: print(m, file=sys.stderr))
    print(json.dumps(summary, indent=1))
    return 0


def cmd_janitor(args: argparse.Namespace, settings: Settings) -> int:
    from scheduler.janitor import run_janitor

    return run_janitor(settings, interval=args.interval, once=args.once, log=logs.get("janitor"))


def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from producer.demo import run_demo

    return run_demo(settings, out=args.out, size=args.size, steps=args.steps)


COMMANDS = {
    "submit": cmd_submit, "status": cmd_status, "wait": cmd_wait, "results": cmd_results, "cancel": cmd_cancel,
    "worker": cmd_worker, "demo": cmd_demo, "janitor": cmd_janitor, "quantize": cmd_quantize, "health": cmd_health,
    "make-model": cmd_make_model,
}

# --- webhooks ---------------------------------------------------------------------------------------

WEBHOOKS_EPILOG = """\
examples:
  sdfleet webhooks new-secret                   print a fresh whsec_ secret for SDFLEET_WEBHOOK_SECRET
  sdfleet webhooks list-failed --json           dead deliveries, one JSON object a line
  sdfleet webhooks replay msg_3f2a... msg_9c1d...  resend those, with the same webhook-id
  sdfleet webhooks replay --all
  SDFLEET_WEBHOOK_SECRET=whsec_new SDFLEET_WEBHOOK_PREVIOUS_SECRETS=whsec_old sdfleet webhook-worker
                                                rotation window: signed with both, until the old one is removed
"""


def _add_webhook_parsers(sub: Any) -> None:
    wh = sub.add_parser("webhooks", help="inspect and replay failed webhook deliveries; make secrets",
                        epilog=WEBHOOKS_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    whs = wh.add_subparsers(dest="webhooks_command", required=True, metavar="ACTION", parser_class=_Parser)
    lf = whs.add_parser("list-failed", help="list deliveries in the dead-letter list")
    lf.add_argument("--json", action="store_true", help="one JSON object a line (with the payload)")
    rp = whs.add_parser("replay", help="re-enqueue dead deliveries with the same webhook-id")
    rp.add_argument("ids", nargs="*", metavar="ID", help="webhook-id(s) as shown by list-failed")
    rp.add_argument("--all", action="store_true", help="replay every dead delivery")
    whs.add_parser("new-secret", help="print a new signing secret (whsec_ + base64 of 32 random bytes)")
    ww = sub.add_parser("webhook-worker", help="run the webhook sender (its own queue; no GPU)")
    ww.add_argument("--threads", type=int, default=8, help="concurrent deliveries (default 8)")
    ww.add_argument("--worker-id")
    ww.add_argument("--metrics-port", type=int, help="serve Prometheus /metrics here (0: a free port; "
                                                    "default SDFLEET_METRICS_PORT, else none)")


def _check_webhook_urls(result: Any, defaults: dict[str, Any], settings: Settings) -> None:
    """Webhook URL policy at submit time: the flag names --webhook, a line names its line and field."""
    from sdfleet.errors import WebhookError
    from sdfleet.webhooks.policy import check_url

    allow = settings.webhook_allow_private
    if defaults.get("webhook"):
        try:
            check_url(defaults["webhook"], allow_private=allow)
        except WebhookError as exc:
            raise InvalidJob(str(exc), field="--webhook") from None
    verdict: dict[str, str | None] = {defaults.get("webhook") or "": None}
    kept = []
    for line, spec in result.jobs:
        if spec.webhook and spec.webhook not in verdict:
            try:
                check_url(spec.webhook, allow_private=allow)
                verdict[spec.webhook] = None
            except WebhookError as exc:
                verdict[spec.webhook] = str(exc)
        bad = verdict.get(spec.webhook or "")
        if bad:
            result.errors.append(InvalidJob(bad, field="webhook", line=line))
        else:
            kept.append((line, spec))
    result.jobs[:] = kept
    result.errors.sort(key=lambda e: e.line or 0)


def cmd_webhooks(args: argparse.Namespace, settings: Settings) -> int:
    from sdfleet.webhooks import new_secret, outbox

    if args.webhooks_command == "new-secret":
        print(new_secret())
        return 0
    from sdfleet.redisconn import check_reachable, connect

    check_reachable(settings.redis_url)
    r = connect(settings.redis_url)
    if args.webhooks_command == "list-failed":
        entries = outbox.dead(r)
        for e in entries:
            if args.json:
                print(json.dumps(e))
            else:
                when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(e.get("failed_at") or 0))
                print(f"{e['id']}  {e['type']:<15}  {when}  job={e.get('job_id') or '-'}  batch={e.get('batch_id')}"
                      f"  {e['url']}\n    {e.get('reason')}")
        if not args.json:
            print(f"{len(entries)} failed deliver{'y' if len(entries) == 1 else 'ies'}", file=sys.stderr)
        return 0
    if not args.all and not args.ids:
        raise ConfigError("sdfleet webhooks replay: give webhook-id(s) (see 'sdfleet webhooks list-failed') or --all")
    if args.all and args.ids:
        raise ConfigError("sdfleet webhooks replay: give webhook-id(s) or --all, not both")
    from sdfleet.queue import make_app

    replayed, missing = outbox.replay(r, make_app(settings), None if args.all else args.ids)
    for i in replayed:
        print(i)
    print(f"{len(replayed)} deliver{'y' if len(replayed) == 1 else 'ies'} re-enqueued", file=sys.stderr)
    for i in missing:
        print(f"sdfleet: no dead delivery with id {i}", file=sys.stderr)
    return 2 if missing else 0


def cmd_webhook_worker(args: argparse.Namespace, settings: Settings) -> int:
    from sdfleet.webhooks import parse_secrets, run_webhook_worker

    if not 1 <= args.threads <= 256:
        raise ConfigError("--threads must be 1..256")
    parse_secrets(settings.webhook_secret)  # a malformed list is an error now, not at the first delivery
    parse_secrets(settings.webhook_previous_secrets, name="SDFLEET_WEBHOOK_PREVIOUS_SECRETS")
    return run_webhook_worker(settings, threads=args.threads, worker_id=args.worker_id,
                              metrics_port=_metrics_port(args, settings))


COMMANDS.update({"webhooks": cmd_webhooks, "webhook-worker": cmd_webhook_worker})

# --- scaling and views ------------------------------------------------------------------------------

FLEET_EPILOG = """\
examples:
  sdfleet scheduler --driver local --model tiny --min-workers 0 --max-workers 2 --cooldown-s 5 --metrics-port 9200
  sdfleet scheduler --driver local --model /models/sd3.5-large --max-workers 8 --worker-args "--max-batch 4"
  sdfleet scheduler --model sd3.5-large --max-workers 1000 --metrics-port 9200   # KEDA reads /scale/sd3.5-large
"""


def _add_fleet_parsers(sub: Any) -> None:
    from sdfleet.settings import DEFAULT_SCALE_COOLDOWN_S, DEFAULT_TARGET_DRAIN_S

    sc = sub.add_parser("scheduler", help="size each worker pool to its backlog (local processes or KEDA)",
                        epilog=FLEET_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sc.add_argument("--driver", choices=["local", "none"], default="none",
                    help="local: start and drain 'sdfleet worker' processes here; none: only publish the "
                         "desired counts (Kubernetes: KEDA's metrics-api trigger reads /scale/<pool>)")
    sc.add_argument("--model", action="append", default=[], dest="models",
                    help="pool to manage (repeatable; a local SD3.5 directory or tiny/null); default: every "
                         "pool with a queue or a live worker (--driver none only)")
    sc.add_argument("--min-workers", type=int, default=0)
    sc.add_argument("--max-workers", type=int, default=1)
    sc.add_argument("--pool", action="append", default=[], metavar="POOL=MIN:MAX", dest="pool_limits",
                    help="min and max workers of one pool, overriding --min-workers/--max-workers (repeatable)")
    sc.add_argument("--target-drain-s", type=float, default=None,
                    help=f"size a pool to work off its backlog in this time (default SDFLEET_SCALE_TARGET_DRAIN_S, "
                         f"{DEFAULT_TARGET_DRAIN_S:g})")
    sc.add_argument("--cooldown-s", type=float, default=None,
                    help=f"shrink only after the need stayed lower this long (default SDFLEET_SCALE_COOLDOWN_S, "
                         f"{DEFAULT_SCALE_COOLDOWN_S:g})")
    sc.add_argument("--max-batch", type=int, default=4, help="jobs per worker batch (caps workers per job)")
    sc.add_argument("--target-utilization", type=float, default=0.9,
                    help="keep busy workers at this fraction of the pool (default 0.9)")
    sc.add_argument("--interval", type=float, default=2.0, help="seconds between decisions")
    sc.add_argument("--metrics-port", type=int, help="serve /metrics and /scale/<pool> here (0: a free port)")
    sc.add_argument("--worker-args", default="", help="extra flags for each local worker, e.g. \"--max-batch 8\"")
    sc.add_argument("--worker-metrics-port-base", type=int,
                    help="local worker i gets --metrics-port BASE+i")
    sc.add_argument("--drain-timeout-s", type=float, default=600.0,
                    help="at exit, wait this long for local workers to drain (never killed)")
    sc.add_argument("--once", action="store_true", help="one decision, then exit")

    wk = sub.add_parser("workers", help="list live workers (heartbeats)")
    wk.add_argument("--json", action="store_true", help="one JSON object a line per live worker")
    tp = sub.add_parser("top", help="live view of workers, pools and batches")
    tp.add_argument("--interval", type=float, default=1.0)
    tp.add_argument("--once", action="store_true", help="print one frame and exit")
    tp.add_argument("--batches", type=int, default=8, help="recent batches shown")

    sm = sub.add_parser("simulate", help="discrete-event simulation of the autoscaler on an arrival trace")
    sm.add_argument("--trace", choices=["bursty-day", "steady", "overnight", "all"], default="all")
    sm.add_argument("--jobs", type=int, default=1_000_000, help="jobs in the trace (default 1,000,000)")
    sm.add_argument("--max-workers", type=int, default=1000)
    sm.add_argument("--min-workers", type=int, default=0)
    sm.add_argument("--target-drain-s", type=float, default=DEFAULT_TARGET_DRAIN_S)
    sm.add_argument("--cooldown-s", type=float, default=DEFAULT_SCALE_COOLDOWN_S)
    sm.add_argument("--max-batch", type=int, default=4)
    sm.add_argument("--target-utilization", type=float, default=0.9)
    sm.add_argument("--model", default="large", choices=["large", "medium"],
                    help="service times of this engine (docs/PERFORMANCE.md)")
    sm.add_argument("--cold-start-s", type=float, default=60.0, help="pod start + model load + warm-up")
    sm.add_argument("--tick-s", type=float, default=15.0, help="seconds between scheduler decisions")
    sm.add_argument("--seed", type=int, default=1)
    sm.add_argument("--json", action="store_true")
    sm.add_argument("--measure", type=int, metavar="N", default=0,
                    help="instead: run N jobs through submit, a null-engine worker, webhooks and housekeeping on a "
                         "private redis-server and print what each costs per job")


def _metrics_port(args: argparse.Namespace, settings: Settings) -> int | None:
    port = args.metrics_port if args.metrics_port is not None else settings.metrics_port
    if port is not None and not 0 <= port <= 65535:
        raise ConfigError(f"--metrics-port {port}: use 0..65535 (0 picks a free port)")
    return port


def cmd_scheduler(args: argparse.Namespace, settings: Settings) -> int:
    import shlex

    from scheduler.policy import PoolConfig
    from scheduler.service import run_scheduler

    if args.driver == "local" and len(args.models) != 1:
        raise ConfigError("--driver local: give exactly one --model (tiny, null or a local SD3.5 directory)")
    if args.interval <= 0:
        raise ConfigError("--interval must be > 0")
    config = PoolConfig(min_workers=args.min_workers, max_workers=args.max_workers,
                        target_drain_s=args.target_drain_s or settings.scale_target_drain_s,
                        cooldown_s=settings.scale_cooldown_s if args.cooldown_s is None else args.cooldown_s,
                        max_batch=args.max_batch, target_utilization=args.target_utilization)
    try:
        worker_args = shlex.split(args.worker_args)
    except ValueError as exc:
        raise ConfigError(f"--worker-args {args.worker_args!r}: {exc}") from None
    return run_scheduler(settings, config=config, driver=args.driver, models=args.models, interval=args.interval,
                         metrics_port=_metrics_port(args, settings), worker_args=worker_args,
                         worker_metrics_port_base=args.worker_metrics_port_base,
                         drain_timeout_s=args.drain_timeout_s, once=args.once, log=logs.get("scheduler"),
                         pool_limits=args.pool_limits)


def cmd_workers(args: argparse.Namespace, settings: Settings) -> int:
    from scheduler.observe import live_workers, worker_row
    from sdfleet.redisconn import connect

    rows = [worker_row(w) for w in live_workers(connect(settings.redis_url))]
    for row in rows:
        if args.json:
            print(json.dumps(row))
        else:
            print(f"{row['id']:<40} {row['pool']:<16} {row['device']:<8} {row['state']:<9} "
                  f"batch {row['current_batch']}  {row['images_per_s'] or 0:.2f} img/s")
    if not args.json:
        print(f"{len(rows)} live worker(s)", file=sys.stderr)
    return 0


def cmd_top(args: argparse.Namespace, settings: Settings) -> int:
    from scheduler.top import run_top
    from sdfleet.redisconn import connect

    return run_top(connect(settings.redis_url), interval=args.interval, once=args.once, batches=args.batches)


def cmd_simulate(args: argparse.Namespace, settings: Settings) -> int:
    from scheduler.policy import PoolConfig
    from scheduler.simulate import run_simulations

    if args.measure:
        from scheduler.costs import measure

        print(json.dumps(measure(args.measure, max_batch=args.max_batch, log=lambda m: print(m, file=sys.stderr)),
                         indent=1))
        return 0
    if args.jobs < 1:
        raise ConfigError("--jobs must be >= 1")
    config = PoolConfig(min_workers=args.min_workers, max_workers=args.max_workers,
                        target_drain_s=args.target_drain_s, cooldown_s=args.cooldown_s, max_batch=args.max_batch,
                        target_utilization=args.target_utilization)
    config.check()
    return run_simulations(config, trace=args.trace, jobs=args.jobs, model=args.model,
                           cold_start_s=args.cold_start_s, tick_s=args.tick_s, seed=args.seed, as_json=args.json)


COMMANDS.update({"scheduler": cmd_scheduler, "workers": cmd_workers, "top": cmd_top, "simulate": cmd_simulate})

if __name__ == "__main__":
    sys.exit(main())
