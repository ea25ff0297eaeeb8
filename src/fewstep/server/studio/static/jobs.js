// The page's jobs: at most one on the server and one waiting here. A newer request replaces
// the waiting one and stops the running one, so real-time typing never piles up jobs. A full
// queue (429) is retried once, after the server's Retry-After.

import { ApiError } from "./api.js";

const FINAL = new Set(["done", "failed", "cancelled", "expired"]);
const POLL_MS = 500;

// `view` shows what happens:
//   phase(name)           submitting, busy, queued, running, done, failed, cancelled, expired
//   status(text)          one line for people
//   started(job)          a job begins (nothing sent yet)
//   accepted(job)         the server took it: job.id is set
//   event(job, event)     a server-sent event: state, started, progress, preview
//   done(job, result)     the finished job's result (GET /v1/jobs/{id})
//   ended(job, final)     it was cancelled, failed or expired (`final.error` when it failed)
//   error(error)          it could not be submitted or followed
//   settled()             this job is over (the next one, if any, starts right after)
//   counters(runner)      `pending` / `superseded` changed
export class JobRunner {
  constructor(api, view) {
    this.api = api;
    this.view = view;
    this.current = null;
    this.pending = null;
    this.superseded = 0;
  }

  get busy() {
    return this.current !== null;
  }

  // Run `job` ({task, body, ...}) now, or after the running one, which is stopped.
  request(job) {
    if (!this.current) {
      this.run(job);
      return;
    }
    this.pending = job;
    this.superseded += 1;
    this.view.counters(this);
    this.stop();
  }

  // Stop the running job and forget the waiting one.
  cancel() {
    this.pending = null;
    this.view.counters(this);
    this.stop();
  }

  stop() {
    const job = this.current;
    if (!job || job.stopRequested) return;
    job.stopRequested = true;
    job.wake?.();
    if (job.id) this.cancelOnServer(job.id);
    this.view.status(this.pending ? "Stopping the previous request…" : "Cancelling…");
  }

  cancelOnServer(id, options = {}) {
    return this.api.post(`/v1/jobs/${encodeURIComponent(id)}/cancel`, undefined, options)
      .catch(() => {});
  }

  async run(spec) {
    const job = { ...spec, id: null, stopRequested: false, wake: null };
    this.current = job;
    this.view.started(job);
    try {
      const accepted = await this.submit(job);
      if (!accepted) { // stopped while waiting to retry: nothing reached the server
        this.view.phase("cancelled");
        this.view.status(this.pending ? "Superseded by a newer request." : "Cancelled.");
        return;
      }
      job.id = accepted.id;
      this.view.accepted(job);
      if (job.stopRequested) this.cancelOnServer(job.id);
      const final = await this.follow(job);
      if (final.event === "done") {
        const info = await this.api.get(`/v1/jobs/${encodeURIComponent(job.id)}`);
        await this.view.done(job, info.result);
      } else {
        this.view.ended(job, final);
      }
    } catch (err) {
      this.view.error(err);
    } finally {
      this.current = null;
      this.view.settled();
      const next = this.pending;
      this.pending = null;
      this.view.counters(this);
      if (next) this.run(next);
    }
  }

  async submit(job) {
    const path = `/v1/${job.task}?wait=false`;
    try {
      return await this.api.post(path, job.body);
    } catch (err) {
      if (!(err instanceof ApiError) || err.status !== 429) throw err;
      this.view.phase("busy");
      if (!await this.countdown(job, Math.max(1, err.retryAfter ?? 2))) return null;
      this.view.phase("submitting");
      this.view.status("Retrying…");
      try {
        return await this.api.post(path, job.body);
      } catch (again) {
        if (again instanceof ApiError && again.status === 429) {
          throw new ApiError(429, again.type,
            `The server is still busy (${again.message}). Try again in a moment.`, null,
            again.retryAfter);
        }
        throw again;
      }
    }
  }

  // Resolves true after `seconds`, false when the job is stopped first.
  countdown(job, seconds) {
    return new Promise((resolve) => {
      let left = seconds;
      let timer = null;
      const tick = () => {
        if (left <= 0) {
          job.wake = null;
          resolve(true);
          return;
        }
        this.view.status(`Server busy, retrying in ${left} s…`);
        left -= 1;
        timer = setTimeout(tick, 1000);
      };
      job.wake = () => {
        clearTimeout(timer);
        job.wake = null;
        resolve(false);
      };
      tick();
    });
  }

  // The job's events until it ends; if the stream breaks, its state by polling.
  async follow(job) {
    try {
      for await (const event of this.api.events(job.id)) {
        this.view.event(job, event);
        if (FINAL.has(event.event)) return event;
        // a job that ended before the stream opened: its first event says so
        if (event.event === "state" && FINAL.has(event.state)) {
          return { ...event, event: event.state };
        }
      }
    } catch (err) {
      if (err instanceof ApiError && err.status === 401) throw err;
    }
    for (;;) {
      const info = await this.api.get(`/v1/jobs/${encodeURIComponent(job.id)}`);
      if (FINAL.has(info.state)) return { event: info.state, ...info };
      await new Promise((resolve) => { setTimeout(resolve, POLL_MS); });
    }
  }
}
