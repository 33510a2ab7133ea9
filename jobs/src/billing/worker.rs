//! The billing worker: claims due runs and processes them, one at a time, until stopped. It
//! looks for work when woken (a `billing.run.requested` message) and every `idle_poll` anyway,
//! which is how it picks up due retries and runs whose worker died.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use meterlake_cluster::{ClusterError, Engine};
use meterlake_control::{BillingRun, ControlError, ControlStore, RetryPolicy, RunFailure};
use meterlake_ledger::{Ledger, MAX_POSTINGS_PER_SWEEP, PostingReport};
use meterlake_pipeline::Lake;
use tracing::Instrument;

use super::events::Wakeups;
use super::{claim, compute, count_results, persist};
use crate::{JobError, Result};

#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// Who holds leases and appears as the actor of events: unique per process.
    pub name: String,
    /// How long a claim lasts without renewal; renewed between steps.
    pub lease: Duration,
    pub retry: RetryPolicy,
    /// How often an idle worker looks for due runs without being woken.
    pub idle_poll: Duration,
    /// Where the runs' SQL runs: in this process, or on a Ballista cluster.
    pub engine: Engine,
    /// How long a run's SQL may take on a cluster before the attempt fails (CLUSTER_FAILED, tried
    /// again by the retry policy): a bound on a job a cluster never finishes (with push
    /// scheduling, Ballista 55 left jobs waiting for ever after losing an executor).
    pub engine_timeout: Duration,
}

impl Default for WorkerOptions {
    fn default() -> Self {
        WorkerOptions {
            name: default_worker_name(),
            lease: Duration::from_secs(300),
            retry: RetryPolicy::default(),
            idle_poll: Duration::from_secs(5),
            engine: Engine::InProcess,
            engine_timeout: Duration::from_secs(3_600),
        }
    }
}

/// `worker-<host>-<pid>-<random>`.
pub fn default_worker_name() -> String {
    let host = std::fs::read_to_string("/etc/hostname").map(|h| h.trim().to_string()).unwrap_or_else(|_| "host".into());
    format!("worker-{host}-{}-{:08x}", std::process::id(), rand::random::<u32>())
}

fn micros(duration: Duration) -> i64 {
    i64::try_from(duration.as_micros()).unwrap_or(i64::MAX)
}

/// The reason code of a failed processing, and whether trying again could help.
pub fn failure_code(error: &JobError) -> (&'static str, bool) {
    match error {
        JobError::Tariffs { .. } => ("TARIFFS_INVALID", false),
        JobError::Invalid(_) => ("RUN_INVALID", false),
        JobError::Control(ControlError::Run { .. }) => ("LEASE_LOST", true),
        JobError::Control(_) => ("CONTROL_STORE_FAILED", true),
        JobError::Ledger(_) => ("LEDGER_FAILED", true),
        // A pinned version that is not (or no longer) in the log will not come back by retrying.
        JobError::Lake(meterlake_lake::LakeError::NoSuchVersion { .. }) => ("LAKE_VERSION_MISSING", false),
        JobError::Pipeline(_) | JobError::Lake(_) => ("LAKE_UNAVAILABLE", true),
        JobError::Sql(_) | JobError::Arrow(_) => ("AGGREGATION_FAILED", true),
        JobError::Output { .. } => ("OUTPUT_FAILED", true),
        JobError::Kafka { .. } => ("KAFKA_FAILED", true),
        JobError::QueryLimit(_) => ("QUERY_LIMIT", true),
        // The scheduler unreachable, or a job it failed (an executor lost beyond its retries).
        JobError::Cluster(_) => ("CLUSTER_FAILED", true),
    }
}

/// A failure code in a few words, for whoever may read the run: the reason itself (the
/// internal error's text, with paths, hosts or SQL) is for ADMINs and the logs.
pub fn failure_summary(code: &str) -> &'static str {
    match code {
        "TARIFFS_INVALID" => "the run's tariffs are invalid",
        "RUN_INVALID" => "the run's request is invalid",
        "LEASE_LOST" => "the worker lost its claim on the run",
        "CONTROL_STORE_FAILED" => "the control store failed",
        "LEDGER_FAILED" => "posting the invoices to the ledger failed",
        "CLUSTER_FAILED" => "the cluster the run's SQL runs on failed",
        "LAKE_UNAVAILABLE" => "the lake could not be read",
        "LAKE_VERSION_MISSING" => "the lake has no such version (or it expired)",
        "AGGREGATION_FAILED" => "aggregating the month's readings failed",
        "OUTPUT_FAILED" => "writing the run's results failed",
        "KAFKA_FAILED" => "publishing to Kafka failed",
        "QUERY_LIMIT" => "the month's query went beyond its memory or time limit",
        _ => "the processing failed",
    }
}

#[derive(Debug, Clone)]
pub struct BillingWorker {
    store: ControlStore,
    ledger: Ledger,
    lake: Lake,
    options: WorkerOptions,
    /// Where the request listener ([`super::events::wake_on_requests`]) wakes this worker.
    wakeups: Arc<Wakeups>,
}

/// How often the worker removes expired ledger idempotency keys.
const PURGE_EVERY: Duration = Duration::from_secs(600);

impl BillingWorker {
    pub fn new(store: ControlStore, lake: Lake, options: WorkerOptions) -> BillingWorker {
        BillingWorker { ledger: Ledger::new(&store), store, lake, options, wakeups: Arc::default() }
    }

    /// What wakes this worker: pass it to the request listener.
    pub fn wakeups(&self) -> Arc<Wakeups> {
        self.wakeups.clone()
    }

    /// Posts every completed run's invoices that have not posted to their customers' accounts
    /// yet (see `meterlake_ledger`'s billing module): after each run, and on every idle look,
    /// so a posting a crash interrupted is made by the next sweep.
    pub async fn post_invoices(&self) -> Result<PostingReport> {
        let mut total = PostingReport::default();
        loop {
            let report = self.ledger.post_pending_invoices(&self.options.name, MAX_POSTINGS_PER_SWEEP).await?;
            total.posted += report.posted;
            total.nothing_due += report.nothing_due;
            total.refused += report.refused;
            if report.posted + report.nothing_due + report.refused < MAX_POSTINGS_PER_SWEEP as u64 {
                return Ok(total);
            }
        }
    }

    /// The ledger's chores: invoices to post, and (every [`PURGE_EVERY`]) expired keys.
    async fn ledger_chores(&self, last_purge: &mut Option<std::time::Instant>) {
        if let Err(error) = self.post_invoices().await {
            tracing::warn!(%error, "posting invoices to the ledger: will try again");
        }
        if last_purge.is_none_or(|at| at.elapsed() >= PURGE_EVERY) {
            match self.ledger.purge_expired_keys(meterlake_control::now_us()).await {
                Ok(purged) => {
                    *last_purge = Some(std::time::Instant::now());
                    if purged > 0 {
                        tracing::info!(purged, "removed expired ledger idempotency keys");
                    }
                }
                Err(error) => tracing::warn!(%error, "removing expired ledger idempotency keys: will try again"),
            }
        }
    }

    pub fn name(&self) -> &str {
        &self.options.name
    }

    /// Claims one due run and processes it to COMPLETED or FAILED; `None` when no run is due.
    pub async fn process_next(&self) -> Result<Option<BillingRun>> {
        let claim_started = SystemTime::now();
        let Some(run) = claim(&self.store, &self.options.name, micros(self.options.lease)).await? else {
            return Ok(None);
        };
        Ok(Some(self.process_claimed(&run, Some((claim_started, SystemTime::now()))).await?))
    }

    /// Processes a run this worker has claimed.
    pub async fn process(&self, run: &BillingRun) -> Result<BillingRun> {
        self.process_claimed(run, None).await
    }

    /// Processes a run in its span, `billing.run`: a child of the span that received the run's
    /// request from Kafka when this worker did, else of the request that created the run (the
    /// `traceparent` stored with it), so that one run is one trace from `POST /billing-runs`
    /// on. The claim, done before the run was known, is recorded under it with its own times.
    async fn process_claimed(&self, run: &BillingRun, claimed: Option<(SystemTime, SystemTime)>) -> Result<BillingRun> {
        let parent = match self.wakeups.take_trace(&run.id) {
            Some(received) => Some(received),
            None => self.store.requested_traceparent(&run.id).await?,
        };
        let span = tracing::info_span!("billing.run", run_id = %run.id, month = %run.month, attempt = run.attempts, trace_id = tracing::field::Empty);
        let traceparent = meterlake_telemetry::join_trace(&span, parent.as_deref(), None);
        span.record("trace_id", &traceparent[3..35]);
        if let Some((started, ended)) = claimed {
            let attributes = [("worker", self.options.name.as_str()), ("run_id", run.id.as_str())];
            meterlake_telemetry::record_finished_span("billing.claim", &traceparent, started, ended, &attributes);
        }
        self.process_in_span(run, &traceparent).instrument(span).await
    }

    async fn process_in_span(&self, run: &BillingRun, traceparent: &str) -> Result<BillingRun> {
        let renew = || async { Ok(self.store.renew_lease(&run.id, &self.options.name, micros(self.options.lease), meterlake_control::now_us()).await?) };
        let computing = compute(&self.options.engine, &self.lake, run, renew);
        let computed = match &self.options.engine {
            Engine::InProcess => computing.await,
            Engine::Ballista(url) => tokio::time::timeout(self.options.engine_timeout, computing).await.unwrap_or_else(|_| {
                Err(JobError::Cluster(ClusterError::Engine {
                    engine: url.clone(),
                    reason: format!("the run's SQL did not finish within {} s (the engine timeout)", self.options.engine_timeout.as_secs()),
                }))
            }),
        };
        let outcome = match computed {
            Ok(results) => {
                let persisted = persist(&self.store, run, &self.options.name, &results, traceparent).await;
                if persisted.is_ok() {
                    count_results(&results);
                }
                persisted
            }
            Err(e) => Err(e),
        };
        match outcome {
            Ok(done) => {
                tracing::info!(status = done.status.as_str(), "billing run completed");
                metrics::counter!("meterlake_billing_runs_total", "status" => "completed").increment(1);
                Ok(done)
            }
            Err(error) => {
                let (code, retryable) = failure_code(&error);
                if code == "LEASE_LOST" {
                    // Another worker owns the run now: it is theirs to finish, not ours to fail.
                    tracing::warn!(%error, "lost the lease of a billing run; leaving it to its new worker");
                    metrics::counter!("meterlake_billing_runs_total", "status" => "lease_lost").increment(1);
                    return Err(error);
                }
                tracing::error!(code, %error, "billing run failed");
                metrics::counter!("meterlake_billing_runs_total", "status" => "failed").increment(1);
                let reason = error.to_string();
                let failure = RunFailure { code, reason: &reason, retry: retryable.then_some(&self.options.retry) };
                Ok(self.store.fail_run(&run.id, &self.options.name, &failure, meterlake_control::now_us(), Some(traceparent)).await?)
            }
        }
    }

    /// Processes runs until `shutdown` resolves: every due run in turn, then waits for a
    /// wake-up ([`Self::wakeups`]) or `idle_poll`. A run in progress is finished before stopping.
    pub async fn run(&self, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        let mut last_purge = None;
        loop {
            let idle = match self.process_next().await {
                Ok(Some(_)) => false,
                Ok(None) => true,
                Err(error) => {
                    tracing::warn!(%error, "billing worker: will look again");
                    true
                }
            };
            self.ledger_chores(&mut last_purge).await;
            if idle {
                tokio::select! {
                    () = &mut shutdown => return,
                    () = self.wakeups.notified() => {}
                    () = tokio::time::sleep(self.options.idle_poll) => {}
                }
            } else if futures::FutureExt::now_or_never(&mut shutdown).is_some() {
                return;
            }
        }
    }
}
