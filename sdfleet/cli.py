"""The ``sdfleet`` command line: one command, a subcommand per role.

Exit codes: 0 success; 1 a job failed or a runtime error; 2 a usage error (bad flag, bad input file,
unknown batch, bad setting). Settings come from the environment (REDIS_URL, SDFLEET_*), read here only.
"""

from __future__ import annotations

import argparse
import json
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
exit codes: 0 ok; 1 some jobs failed / runtime error; 2 usage error (bad flags, invalid file, unknown batch)
"""


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
    s.add_argument("--webhook-events", help="comma list of job.succeeded,job.failed,batch.completed "
                                            "(default: all)")
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
                           help="give up after this many seconds (exit 1), saying what is still queued and "
                                "running (default: wait until every job has ended)")
    r = sub.add_parser("results", help="write the manifest of a batch (one JSON line per job)")
    r.add_argument("batch")
    r.add_argument("-o", "--output", help="manifest file (default: stdout)")
    r.add_argument("--url-style", choices=["s3", "https", "presigned"],
                   help="URL style (default: the one the batch was submitted with)")

    w = sub.add_parser("worker", help="run one worker process owning one device")
    w.add_argument("--device", default="cpu", help="cuda:N or cpu")
    w.add_argument("--model", default="tiny", help="tiny, or a local SD3.5 diffusers directory")
    w.add_argument("--max-batch", type=int, default=4)
    w.add_argument("--max-wait-ms", type=float, default=50.0)
    w.add_argument("--precision", default="auto", choices=["auto", "fp8", "bf16", "fp32"])
    w.add_argument("--fp8-weights", help="directory written by 'sdfleet quantize' (cold start without re-quantizing)")
    w.add_argument("--worker-id")
    w.add_argument("--warmup", action="append", default=[], metavar="WxH:STEPS",
                   help="shape to run once at boot, e.g. 1024x1024:28 (repeatable)")
    w.add_argument("--post-threads", type=int, default=2,
                   help="engine runs stored and recorded at once (default 2)")
    # One switch per speed-up, so each one's effect can be measured alone (all on by default).
    for name in ("fp8-linears", "fused-quant", "fp8-attention", "cuda-graphs"):
        w.add_argument(f"--no-{name}", action="store_true", help=f"turn off {name.replace('-', ' ')}")
    # Test hooks for the null engine (queue benchmarks, crash-safety tests); hidden from --help.
    w.add_argument("--null-delay-ms", type=float, default=0.0, help=argparse.SUPPRESS)
    w.add_argument("--null-crash-prompt", default=None, help=argparse.SUPPRESS)

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
    mm.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    mm.add_argument("--device", default="cpu", help="where the random weights are made: cpu or cuda (faster)")
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
    return p


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sdfleet")
    except PackageNotFoundError:
        from sdfleet import __version__

        return __version__


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = None
    try:
        settings = Settings.from_env()
        logs.configure(settings.log_format, settings.log_level)
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
    from producer.submit import submit
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
        raise InvalidJob(str(exc), field="--out") from None
    if args.url_ttl < 1 or args.url_ttl > 7 * 24 * 3600:
        raise InvalidJob("use 1 to 604800 seconds (S3 presigns for at most 7 days)", field="--url-ttl")
    result = read_file(args.file, defaults)
    _check_webhook_urls(result, defaults, settings)  # URL policy: http(s), no private addresses
    name = "standard input" if args.file == "-" else args.file
    if result.errors and not args.skip_invalid:
        raise InvalidFile(name, result.errors)
    for err in result.errors:
        print(f"skipped {err}", file=sys.stderr)
    if not result.jobs:
        raise InvalidJob(f"{name} holds no jobs; nothing was enqueued")
    store, app = _services(settings)
    res = submit([spec for _, spec in result.jobs], store=store, app=app,
                 storage=StorageFactory(settings.s3_endpoint_url, settings.s3_region, settings.upload_retries),
                 default_out=out, batch_name=args.batch, replace=args.replace,
                 webhook_secret=settings.webhook_secret, url_style=args.url_style, url_ttl_s=args.url_ttl,
                 lease_s=settings.submission_lease_s)
    print(res.batch_id)
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
              ", ".join(f"{c[s]} {s}" for s in ("queued", "running", "succeeded", "failed", "cancelled")))
    return 0


def cmd_wait(args: argparse.Namespace, settings: Settings) -> int:
    if args.timeout is not None and not args.timeout >= 0:
        raise ConfigError("--timeout must be a number of seconds >= 0")
    store, _ = _services(settings)
    return _wait(store, args.batch, args.timeout)


def _wait(store: Any, batch_id: str, timeout: float | None) -> int:
    from producer.status import describe, wait_for_batch

    st = wait_for_batch(store, batch_id, timeout=timeout, progress=True)
    c = st["counts"]
    print(describe(st, st.get("idle_queues", ())), file=sys.stderr)
    return 0 if st["complete"] and c["succeeded"] == st["total"] else 1


def cmd_results(args: argparse.Namespace, settings: Settings) -> int:
    from producer.status import manifest_lines
    from sdfleet.events import url_style_of
    from sdfleet.storage import StorageFactory

    store, _ = _services(settings)
    style, ttl = url_style_of(store.r, args.batch)
    storage = StorageFactory(settings.s3_endpoint_url, settings.s3_region, settings.upload_retries)
    lines = manifest_lines(store, args.batch,
                           public_url=lambda u: storage.public_url(u, args.url_style or style, ttl))
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
    store, _ = _services(settings)
    n = store.cancel_batch(args.batch)
    print(f"{n} queued job(s) cancelled; running jobs finish", file=sys.stderr)
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
    extra: dict[str, Any] = {"null_delay_s": args.null_delay_ms / 1000.0, "null_crash_prompt": args.null_crash_prompt}
    if args.fp8_weights:
        extra["fp8_weights"] = args.fp8_weights
    switches = {name: False for name in ("fp8_linears", "fused_quant", "fp8_attention")
                if getattr(args, f"no_{name}")}
    if switches:
        extra["fp8_switches"] = switches
    if args.no_cuda_graphs:
        extra["cuda_graphs"] = False
    opts = WorkerOptions(model=args.model, device=args.device, precision=args.precision, max_batch=args.max_batch,
                         max_wait_ms=args.max_wait_ms, worker_id=args.worker_id or "",
                         post_threads=args.post_threads, engine_extra=extra,
                         warmup=tuple(parse_shape(w, args.model) for w in args.warmup))
    return run_worker(settings, opts)


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
    "worker": cmd_worker, "demo": cmd_demo, "janitor": cmd_janitor, "quantize": cmd_quantize,
    "make-model": cmd_make_model,
}

# --- webhooks ---------------------------------------------------------------------------------------

WEBHOOKS_EPILOG = """\
examples:
  sdfleet webhooks new-secret                   print a fresh whsec_ secret for SDFLEET_WEBHOOK_SECRET
  sdfleet webhooks list-failed --json           dead deliveries, one JSON object a line
  sdfleet webhooks replay msg_3f2a... msg_9c1d...  resend those, with the same webhook-id
  sdfleet webhooks replay --all
  SDFLEET_WEBHOOK_SECRET="whsec_new whsec_old" sdfleet webhook-worker --threads 8
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
    from sdfleet.redisconn import connect

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
    return run_webhook_worker(settings, threads=args.threads, worker_id=args.worker_id)


COMMANDS.update({"webhooks": cmd_webhooks, "webhook-worker": cmd_webhook_worker})

if __name__ == "__main__":
    sys.exit(main())
