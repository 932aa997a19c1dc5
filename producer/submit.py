"""Submitting jobs, all or nothing: a lease on the batch, staged records, the messages, one atomic commit.

1. Every job is validated (by the reader) and serialised here before the first write.
2. The producer takes the batch's submission lease (``keys.submission``, a token with a short TTL, renewed
   while it works); a second producer on the same batch is refused while it is held.
3. The records go to a staging list, invisible to every reader.
4. Every job's Celery message is published. A worker that receives one before the commit finds no record
   it can start and, seeing the lease, holds the message and tries again later.
5. One script (:meth:`JobStore.commit_submission`) makes records, custom-id map, job list, counts, ``total``
   and TTLs visible together, if the lease is still ours, and deletes the lease.

A producer killed anywhere before step 5 leaves no record; its lease expires and workers drop its messages,
which name no job. Killed after step 5, everything is there. Either way nothing half-written ever runs.

Resubmitting under the same batch name runs only what is not done or pending: a job's identity is its
custom_id (given; ``line-000042`` for line 42 of a text file; else derived from its content), its id is
derived from (batch, custom_id). A custom_id already in the batch with different parameters is a conflict
(the idempotency-key rule): rejected, listing the custom_ids, unless ``replace`` is set.
"""

from __future__ import annotations

import json
import re
import secrets
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from celery import Celery

from sdfleet import keys
from sdfleet.errors import InvalidJob, StorageError
from sdfleet.jobs import JobSpec
from sdfleet.queue import GENERATE_TASK
from sdfleet.settings import DEFAULT_SUBMISSION_LEASE_S
from sdfleet.state import CANCELLED, FAILED, RUNNING, SUCCEEDED, JobStore, StagedJob
from sdfleet.storage import URL_STYLES, StorageFactory, check_location, normalize_out

_BATCH_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_NS = uuid.UUID("6f1d3c1e-6a43-4c55-9d1e-0f3b3c2a9e10")
CHUNK = 2000
# The parameters that make a job what it is: a resubmission that changes one of them is a conflict.
PARAMETERS = ("prompt", "negative_prompt", "width", "height", "steps", "guidance_scale", "model", "seed")
SHOWN_CONFLICTS = 20
# Planning and serialising check the lease this often (a time check; it renews when a third has passed), so a
# producer that keeps working keeps its lease however large the file.
RENEW_EVERY = 500
# A job in the hands of a worker (running, or storing its objects) cannot be replaced under it.
IN_FLIGHT = (RUNNING, "storing")


@dataclass(frozen=True)
class SubmitResult:
    batch_id: str
    total: int
    enqueued: int
    skipped_done: int
    skipped_pending: int
    replaced: int = 0
    queues: tuple[str, ...] = field(default_factory=tuple)


def check_batch_name(name: str) -> str:
    if not isinstance(name, str) or not _BATCH_NAME.fullmatch(name):
        raise InvalidJob("use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit", field="--batch")
    return name


def new_batch_id() -> str:
    return time.strftime("b%Y%m%d-%H%M%S-", time.gmtime()) + secrets.token_hex(3)


def job_id_for(batch_id: str, custom_id: str) -> str:
    return uuid.uuid5(_NS, f"{batch_id}/{custom_id}").hex


def assign_custom_ids(specs: Sequence[JobSpec]) -> list[JobSpec]:
    """Give each job without a custom_id one derived from its content (the k-th repeat gets a suffix)."""
    seen: Counter[str] = Counter()
    out = []
    for spec in specs:
        if spec.custom_id is None:
            base = "j" + spec.identity()
            seen[base] += 1
            cid = base if seen[base] == 1 else f"{base}-{seen[base]}"
            spec = spec.model_copy(update={"custom_id": cid})
        out.append(spec)
    return out


def serialise(spec: JobSpec) -> str:
    """The spec as stored and sent; InvalidJob (naming the custom_id) if it cannot be written as UTF-8 JSON."""
    try:
        text = spec.model_dump_json()
        text.encode("utf-8")
    except (ValueError, UnicodeError) as exc:  # pydantic's serialisation error is a ValueError
        raise InvalidJob(f"cannot be serialised ({str(exc)[:120]}); nothing was enqueued",
                         field=f"custom_id {spec.custom_id}") from None
    return text


def changed_parameters(stored: dict[str, Any], spec: JobSpec) -> list[str]:
    """The parameters in which ``spec`` differs from a job's stored spec (a seed only when one is given)."""
    new = spec.model_dump(mode="json")
    return [name for name in PARAMETERS
            if not (name == "seed" and new.get("seed") is None) and stored.get(name) != new.get(name)]


def key_id(secret: str) -> str:
    """A webhook signing secret's id: what a batch records instead of the secret itself."""
    import hashlib

    return hashlib.sha256(secret.encode()).hexdigest()[:16]


def submit(
    specs: Sequence[JobSpec],
    *,
    store: JobStore,
    app: Celery,
    storage: StorageFactory,
    default_out: str,
    batch_name: str | None = None,
    replace: bool = False,
    webhook_secret: str | None = None,
    url_style: str = "s3",
    url_ttl_s: int = 7 * 24 * 3600,
    lease_s: float = DEFAULT_SUBMISSION_LEASE_S,
) -> SubmitResult:
    """Record and enqueue ``specs`` as one batch, all or nothing. Validation must already have passed.

    Raises InvalidJob (a usage error, nothing written) for a batch another producer is submitting to, and
    for resubmitted custom_ids whose parameters changed unless ``replace``; LeaseLost if the lease expired
    before the commit (nothing recorded). ``webhook_secret``: only its key id is recorded, never the secret
    (the webhook worker signs with the secrets it is configured with).
    """
    batch_id = check_batch_name(batch_name) if batch_name else new_batch_id()
    if url_style not in URL_STYLES:
        raise InvalidJob(f"{url_style!r} is not one of {', '.join(URL_STYLES)}", field="--url-style")
    specs = assign_custom_ids(specs)
    outs: dict[str | None, str] = {}
    for s in [None, *specs]:
        out = default_out if s is None else s.out
        if (None if s is None else s.out) not in outs:
            try:
                outs[None if s is None else s.out] = normalize_out(out)
            except StorageError as exc:  # a symlink loop
                raise InvalidJob(str(exc), field="--out" if s is None else "out") from None
    specs = [s if s.out == outs[s.out] else s.model_copy(update={"out": outs[s.out]}) for s in specs]
    for s in specs:
        serialise(s)  # every line serialises before the first write
    for location in sorted({s.out for s in specs}):
        try:
            check_location(location)
        except StorageError as exc:
            raise InvalidJob(str(exc), field="--out" if location == outs[None] else "out") from None

    token = secrets.token_hex(16)
    if not store.acquire_submission(batch_id, token, lease_s):
        raise InvalidJob(f"another submission to batch '{batch_id}' is in progress; wait until it has finished "
                         f"(at most {lease_s:g} s if its producer died), then submit again", field="--batch")
    try:
        lease = _Lease(store, batch_id, token, lease_s)
        plan = _plan(store, batch_id, specs, replace, lease)
        # An unwritable --out is a usage error (exit 2) before anything is written; checked only once the
        # submission is known to be accepted, because the check creates the directory.
        for location in sorted({spec.out for _, spec, _ in plan.run}):
            lease.renew()
            try:
                storage.get(location).check()
            except StorageError as exc:
                raise InvalidJob(str(exc).removeprefix(f"--out {location}: "),
                                 field="--out" if location == outs[None] else "out") from None
        staged = []
        for i, (jid, spec, mode) in enumerate(plan.run):
            if i % RENEW_EVERY == 0:
                lease.renew()
            staged.append(StagedJob(jid, spec.custom_id, serialise(spec), mode))
        for i in range(0, len(staged), CHUNK):
            lease.renew()
            store.stage(batch_id, token, staged[i:i + CHUNK], lease_s=lease_s)
        for i in range(0, len(staged), CHUNK):
            lease.renew()
            enqueue(app, batch_id, [(x.job_id, x.spec_json, spec.model)
                                    for x, (_, spec, _) in zip(staged[i:i + CHUNK], plan.run[i:i + CHUNK])])
        meta = {"url_style": url_style, "url_ttl_s": str(int(url_ttl_s))}
        # The models the batch's jobs use (with an earlier submission's): the sweep looks for lost jobs of a
        # batch only once one of its models' queues is empty, without reading every record. A batch made before
        # this field existed keeps none (its earlier jobs' models are unknown): the sweep reads its records.
        earlier = store.batch_models(batch_id)
        if earlier or not store.batch_exists(batch_id):
            meta["models"] = ",".join(sorted({s.model for _, s, _ in plan.run} | earlier))
        if webhook_secret:
            meta["webhook_key_id"] = key_id(webhook_secret.replace(",", " ").split()[0])
        result = store.commit_submission(batch_id, token, name=batch_name or batch_id, meta=meta)
    except BaseException:
        # Nothing was committed: hand the lease back now instead of making the next submission wait for it.
        # Messages already published name jobs that do not exist; workers drop them once the lease is gone.
        try:
            store.release_submission(batch_id, token)
        except Exception:  # Redis itself is the problem; the lease expires on its own
            pass
        raise
    queues = tuple(sorted({keys.queue_for_model(spec.model) for _, spec, _ in plan.run}))
    return SubmitResult(batch_id, result.total, result.added + result.requeued, plan.done, plan.pending,
                        plan.replaced, queues)


@dataclass
class _Plan:
    run: list[tuple[str, JobSpec, str]] = field(default_factory=list)  # (job id, spec with seed, mode)
    done: int = 0
    pending: int = 0
    replaced: int = 0


def _plan(store: JobStore, batch_id: str, specs: Sequence[JobSpec], replace: bool, lease: _Lease) -> _Plan:
    r = store.r
    existing: dict[str, str | None] = {}
    custom_ids = [s.custom_id for s in specs]
    for i in range(0, len(custom_ids), CHUNK):
        lease.renew()
        chunk = custom_ids[i:i + CHUNK]
        existing.update(zip(chunk, r.hmget(keys.batch_custom_ids(batch_id), chunk)))
    known = [jid for jid in existing.values() if jid]
    records: dict[str, tuple[str | None, str | None]] = {}
    for i in range(0, len(known), CHUNK):
        lease.renew()
        chunk = known[i:i + CHUNK]
        pipe = r.pipeline(transaction=False)
        for jid in chunk:
            pipe.hmget(keys.job(jid), "status", "spec")
        records.update(zip(chunk, (tuple(x) for x in pipe.execute())))

    plan = _Plan()
    conflicts: list[str] = []
    for i, spec in enumerate(specs):
        if i % RENEW_EVERY == 0:
            lease.renew()
        jid = existing.get(spec.custom_id)
        status, stored_raw = records.get(jid, (None, None)) if jid else (None, None)
        if jid is None or status is None:
            plan.run.append((job_id_for(batch_id, spec.custom_id), spec.with_seed(), "new"))
            continue
        stored = json.loads(stored_raw or "{}")
        if spec.seed is None and stored.get("seed") is not None:
            spec = spec.model_copy(update={"seed": stored["seed"]})  # the job keeps the seed it was given
        changed = changed_parameters(stored, spec)
        if changed and not replace:
            conflicts.append(f"{spec.custom_id} ({', '.join(changed)})")
        elif changed and status in IN_FLIGHT:
            conflicts.append(f"{spec.custom_id} (running now; wait for it or cancel the batch first)")
        elif changed:
            plan.run.append((jid, spec.with_seed(), "replace"))
            plan.replaced += 1
        elif status in (FAILED, CANCELLED):
            plan.run.append((jid, spec.with_seed(), "requeue"))
        elif status == SUCCEEDED:
            plan.done += 1
        else:
            plan.pending += 1
    if conflicts:
        shown = "; ".join(conflicts[:SHOWN_CONFLICTS])
        more = f"; and {len(conflicts) - SHOWN_CONFLICTS} more" if len(conflicts) > SHOWN_CONFLICTS else ""
        raise InvalidJob(f"{len(conflicts)} job(s) of batch '{batch_id}' were submitted before with other "
                         f"parameters: {shown}{more}. Nothing was enqueued. Pass --replace to run them with the "
                         "new parameters, give them new custom_ids, or use another --batch", field="custom_id")
    return plan


class _Lease:
    """Renews the submission lease when a third of its time has passed; LeaseLost if it is gone."""

    def __init__(self, store: JobStore, batch_id: str, token: str, lease_s: float):
        self.store, self.batch_id, self.token, self.lease_s = store, batch_id, token, lease_s
        self.renewed = time.monotonic()

    def renew(self) -> None:
        from sdfleet.errors import LeaseLost

        if time.monotonic() - self.renewed < self.lease_s / 3:
            return
        if not self.store.renew_submission(self.batch_id, self.token, self.lease_s):
            raise LeaseLost(self.batch_id)
        self.renewed = time.monotonic()


def enqueue(app: Celery, batch_id: str, jobs: Sequence[tuple[str, JobSpec | str, str | None]]) -> None:
    """One message per job on its model's queue; the message carries the spec the worker validates.

    ``jobs``: (job id, spec or its JSON, model); the spec in the message is the one the record holds.
    Messages are built by Celery's own protocol code (``create_task_message``) and published straight
    to the model's queue inside ``producer.batch()``, which pipelines the Redis LPUSHes: 10,000 jobs
    take about a second instead of ten through ``send_task``'s per-call routing and repr work.
    """
    if not jobs:
        return
    amqp = app.amqp
    with app.producer_or_acquire() as producer, producer.batch(max_size=CHUNK):
        for item in jobs:
            jid, spec = item[0], item[1]
            if isinstance(spec, JobSpec):
                model, spec_data = spec.model, spec.model_dump(mode="json")
            else:
                spec_data = json.loads(spec)
                model = item[2] if len(item) > 2 and item[2] else spec_data["model"]
            kwargs = {"job_id": jid, "batch_id": batch_id, "spec": spec_data}
            msg = amqp.create_task_message(jid, GENERATE_TASK, (), kwargs, argsrepr="()",
                                           kwargsrepr=f"{{'job_id': '{jid}'}}")
            producer.publish(
                msg.body, exchange="", routing_key=keys.queue_for_model(model),
                headers=msg.headers, serializer="json", retry=True, **msg.properties,
            )
