"""The platform's loop: admit queued jobs whose memory fits, watch running ones, recover lost ones.

One tick a second. A running job whose process is gone without an exit record was lost (the
platform or the machine died under it): it goes back to the queue and starts again with train's
`resume: auto`, so it continues from its last checkpoint. Jobs are claimed in the store, so several
platform instances sharing one store never start the same job twice; each watches the jobs it started.
"""

from __future__ import annotations

import logging
import socket
import threading
import time

from jobs.admission import reason_to_wait
from jobs.model import Job
from jobs.store import JobStore

log = logging.getLogger("guardtune.platform")
HOST = socket.gethostname()
MAX_ATTEMPTS = 3  # starts of one job, resumes included


class Queue:
    def __init__(self, store: JobStore, executor, *, max_running: int = 1, poll_s: float = 1.0):
        self.store, self.executor = store, executor
        self.max_running, self.poll_s = max_running, poll_s
        self.lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def submit(self, job: Job) -> None:
        with self.lock:
            self.store.add(job)
        self.tick()

    def cancel(self, job_id: str) -> Job | None:
        with self.lock:
            job = self.store.get(job_id)
            if job is None or job.state not in ("queued", "running"):
                return job
            was_running = job.state == "running"
            job.state, job.finished, job.waiting_for = "cancelled", time.time(), None
            self.store.save(job)  # first: the watcher must not take the killed run for a lost one
        if was_running:
            self.executor.cancel(job)
        return job

    def tick(self) -> None:
        with self.lock:
            running = [self._watch(j) for j in self.store.list(("running",)) if j.host in (HOST, "")]
            running = [j for j in running if j.state == "running"]
            for job in reversed(self.store.list(("queued",))):  # oldest first
                reason = reason_to_wait(job, running, max_running=self.max_running)
                if reason is not None:
                    if job.waiting_for != reason:
                        job.waiting_for = reason
                        self.store.save(job)
                    break  # first come, first served: a big job is not overtaken forever
                if not self.store.claim(job.id):
                    continue  # another instance took it
                self._start(job)
                running.append(job)

    def _start(self, job: Job) -> None:
        job.state, job.started, job.waiting_for, job.host = "running", time.time(), None, HOST
        job.attempts += 1
        try:
            job.handle = self.executor.start(job)
        except Exception as exc:  # the executor refused (a bad image, the cluster said no): the job fails, not the loop
            job.state, job.finished, job.error = "failed", time.time(), f"could not start: {exc}"
        self.store.save(job)

    def _watch(self, job: Job) -> Job:
        st = self.executor.state(job)
        if st.state == "running":
            if st.rss_bytes:
                job.sample_rss(time.time(), st.rss_bytes)
                self.store.save(job)
            return job
        if st.state == "lost":
            if job.attempts >= MAX_ATTEMPTS:
                job.state, job.finished, job.error = "failed", time.time(), f"lost {job.attempts} times; not retried"
            else:
                job.state, job.waiting_for = "queued", "the platform lost its run; it resumes from the last checkpoint"
            log.warning("job %s: run lost; %s", job.id, job.state)
        else:
            job.state, job.finished, job.exit_code = st.state, time.time(), st.exit_code
            job.peak_rss_bytes = max(st.peak_rss_bytes or 0, job.peak_rss_bytes or 0) or None
            if st.state == "failed":
                job.error = f"train exited with {st.exit_code}; see the log"
        self.store.save(job)
        return job

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="platform-queue", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.tick()
            except Exception:  # a store hiccup: log it and try again next tick
                log.exception("platform queue tick failed")
