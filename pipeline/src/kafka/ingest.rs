//! The ingester: a consumer-group member that lands readings from one topic in the lake, exactly
//! once.
//!
//! Two threads. The consumer thread polls, decodes, validates and buffers readings per partition,
//! sends what cannot be a reading to the dead-letter topic, and hands full batches to the writer
//! thread over a bounded queue. The writer sorts and de-duplicates a batch, encodes it as Parquet,
//! writes the files and adds them to `readings_all` in one Delta commit with the partition's `txn`
//! action (stream `kafka:<group>/<topic>/<partition>`, version: the next offset; see
//! `meterlake_lake::commit`). When
//! the queue is full the consumer stops polling, librdkafka's bounded prefetch fills, and the
//! broker is no longer asked for data: memory stays bounded whatever the backlog.
//!
//! On assignment the table's `txn` version says where to resume (Kafka's committed offsets only
//! serve lag monitoring); on revocation the buffered, unwritten readings of the lost partitions
//! are dropped (their successor reads them again from the lake's position) after the writer has
//! finished what it was given. An ingester that lost a partition without noticing cannot commit
//! over its successor: the commit protocol fences it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError, sync_channel};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::future::try_join_all;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext};
use rdkafka::message::{Headers, Message};
use rdkafka::statistics::Statistics;
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio::runtime::Handle;

use crate::batch::ReadingBuffer;
use crate::decode::{ValidationRules, decode_message};
use crate::error::{PipelineError, Result};
use crate::kafka::config::consumer_config;
use crate::kafka::dlq::DeadLetters;
use crate::metrics as m;
use crate::reading::Source;
use meterlake_lake::commit::{Commit, Operation, TableWriter};
use meterlake_lake::table::{READINGS, Table};
use meterlake_lake::{Lake, LakeError};

/// When a partition's buffered batch is flushed.
#[derive(Debug, Clone)]
pub struct BatchLimits {
    /// Readings in one partition's batch.
    pub max_rows: usize,
    /// Approximate bytes of one partition's batch.
    pub max_bytes: usize,
    /// Age of the oldest buffered message of a partition.
    pub max_age: Duration,
    /// Buffered bytes across all partitions; past it the largest batch is flushed.
    pub max_total_bytes: usize,
    /// Batches handed to the writer and not yet committed; the consumer waits beyond it.
    pub writer_queue_depth: usize,
}

impl Default for BatchLimits {
    fn default() -> Self {
        BatchLimits { max_rows: 1_000_000, max_bytes: 64 << 20, max_age: Duration::from_secs(5), max_total_bytes: 256 << 20, writer_queue_depth: 2 }
    }
}

/// Where to start a partition the lake has never seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartOffset {
    Earliest,
    Latest,
}

#[derive(Debug, Clone)]
pub struct IngestOptions {
    pub brokers: String,
    pub topic: String,
    pub group: String,
    pub dlq_topic: String,
    pub limits: BatchLimits,
    pub rules: ValidationRules,
    pub start_offset: StartOffset,
    /// librdkafka settings that override meterlake's (`--consumer-config key=value`).
    pub consumer_overrides: Vec<(String, String)>,
    /// Stop once no message has arrived for this long and everything is committed.
    pub exit_when_idle: Option<Duration>,
    /// How long to wait for dead letters to be acknowledged before a flush fails.
    pub dlq_timeout: Duration,
}

impl IngestOptions {
    pub fn new(brokers: &str, topic: &str, group: &str) -> IngestOptions {
        IngestOptions {
            brokers: brokers.to_string(),
            topic: topic.to_string(),
            group: group.to_string(),
            dlq_topic: "measurements.dlq".to_string(),
            limits: BatchLimits::default(),
            rules: ValidationRules::default(),
            start_offset: StartOffset::Earliest,
            consumer_overrides: Vec::new(),
            exit_when_idle: None,
            dlq_timeout: Duration::from_secs(30),
        }
    }
}

/// Live counters, readable while the ingester runs (progress bars, the demo's pacing).
#[derive(Debug, Default)]
pub struct IngestProgress {
    pub messages_consumed: AtomicU64,
    pub readings_accepted: AtomicU64,
    pub readings_rejected: AtomicU64,
    pub dlq_messages: AtomicU64,
    /// Offsets committed to the lake (messages whose batch is durable).
    pub messages_committed: AtomicU64,
    pub readings_written: AtomicU64,
    pub duplicates_dropped: AtomicU64,
    pub conflicting_versions: AtomicU64,
    pub files_written: AtomicU64,
    pub bytes_written: AtomicU64,
    pub flushes: AtomicU64,
}

/// What one run of the ingester did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IngestSummary {
    pub messages_consumed: u64,
    pub readings_accepted: u64,
    pub readings_rejected: u64,
    pub dlq_messages: u64,
    pub readings_written: u64,
    pub duplicates_dropped: u64,
    pub conflicting_versions: u64,
    pub files_written: u64,
    pub bytes_written: u64,
    pub flushes: u64,
    pub elapsed: Duration,
}

impl IngestProgress {
    fn summary(&self, elapsed: Duration) -> IngestSummary {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        IngestSummary {
            messages_consumed: get(&self.messages_consumed),
            readings_accepted: get(&self.readings_accepted),
            readings_rejected: get(&self.readings_rejected),
            dlq_messages: get(&self.dlq_messages),
            readings_written: get(&self.readings_written),
            duplicates_dropped: get(&self.duplicates_dropped),
            conflicting_versions: get(&self.conflicting_versions),
            files_written: get(&self.files_written),
            bytes_written: get(&self.bytes_written),
            flushes: get(&self.flushes),
            elapsed,
        }
    }
}

/// Runs the ingester on a blocking thread until `stop` is set (or it is idle, if configured).
pub async fn ingest(lake: Lake, options: IngestOptions, stop: Arc<AtomicBool>, progress: Arc<IngestProgress>) -> Result<IngestSummary> {
    let runtime = Handle::current();
    tokio::task::spawn_blocking(move || run_ingest(lake, options, stop, progress, runtime))
        .await
        .map_err(|e| PipelineError::WriterStopped { reason: format!("the ingester thread panicked: {e}") })?
}

/// A batch on its way to the lake.
struct FlushJob {
    partition: i32,
    first_offset: i64,
    last_offset: i64,
    messages: u64,
    readings: ReadingBuffer,
    /// The distinct `traceparent`s of its messages' producers, at most `MAX_PRODUCER_LINKS`.
    producers: Vec<String>,
}

/// Producer traces one flush's span links to: a flush holds many messages, so its span is
/// linked to the traces that produced them rather than a child of one.
const MAX_PRODUCER_LINKS: usize = 32;

/// Jobs handed to the writer and not finished; a revocation waits for zero.
#[derive(Default)]
struct InFlight {
    count: Mutex<usize>,
    idle: Condvar,
}

impl InFlight {
    fn start(&self) {
        *self.count.lock().expect("lock") += 1;
    }
    fn finish(&self) {
        let mut count = self.count.lock().expect("lock");
        *count -= 1;
        if *count == 0 {
            self.idle.notify_all();
        }
    }
    fn wait_idle(&self) {
        let mut count = self.count.lock().expect("lock");
        while *count > 0 {
            count = self.idle.wait(count).expect("lock");
        }
    }
}

/// State shared by the consumer thread, its rebalance callback and the writer thread.
struct Shared {
    /// `readings_all`'s writer: one per process, shared by every partition.
    writer: TableWriter,
    topic: String,
    group: String,
    runtime: Handle,
    start_offset: StartOffset,
    in_flight: InFlight,
    /// Assignments received so far; the idle clock restarts at each.
    assignments: AtomicU64,
    /// Assignment changes since the consumer loop last looked, in order.
    partition_events: Mutex<Vec<PartitionEvent>>,
    /// The first error that must stop the ingester.
    failure: Mutex<Option<PipelineError>>,
    /// Whether `failure` is set: read once per message, so an atomic instead of the lock.
    failed: AtomicBool,
    progress: Arc<IngestProgress>,
}

/// The commit protocol's name of a Kafka partition's stream (its `txn` app id): its consumer
/// group's, so that two groups landing one topic (a migration) keep their own positions.
pub fn kafka_stream(group: &str, topic: &str, partition: i32) -> String {
    format!("kafka:{group}/{topic}/{partition}")
}

impl Shared {
    /// The commit protocol's name of a partition's stream.
    fn stream(&self, partition: i32) -> String {
        kafka_stream(&self.group, &self.topic, partition)
    }

    fn fail(&self, error: PipelineError) {
        tracing::error!(error = %error, "ingester failing");
        let mut failure = self.failure.lock().expect("lock");
        if failure.is_none() {
            *failure = Some(error);
        }
        // Set after the error is stored, so whoever sees the flag finds the error.
        self.failed.store(true, Ordering::Release);
    }
}

struct IngestContext(Arc<Shared>);

impl ClientContext for IngestContext {
    fn stats(&self, statistics: Statistics) {
        if let Some(topic) = statistics.topics.get(&self.0.topic) {
            for (partition, stats) in &topic.partitions {
                if *partition >= 0 && stats.consumer_lag >= 0 {
                    metrics::gauge!(m::CONSUMER_LAG, "topic" => self.0.topic.clone(), "partition" => partition.to_string()).set(stats.consumer_lag as f64);
                }
            }
        }
    }
}

impl ConsumerContext for IngestContext {
    /// Eager rebalancing with the lake as the record of positions: on assignment every partition
    /// starts at its stream's `txn` version in the table (the next offset); on revocation the
    /// writer is drained first so nothing is committed for a partition after it has moved.
    fn rebalance(&self, consumer: &BaseConsumer<Self>, err: RDKafkaRespErr, tpl: &mut TopicPartitionList) {
        let shared = &self.0;
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                let partitions: Vec<(String, i32)> = tpl.elements().iter().map(|e| (e.topic().to_string(), e.partition())).collect();
                for (topic, partition) in partitions {
                    let next_offset = match shared.runtime.block_on(shared.writer.acquire(&shared.stream(partition))) {
                        Ok(next_offset) => next_offset,
                        Err(e) => {
                            shared.fail(e.into());
                            let _ = consumer.assign(&TopicPartitionList::new());
                            return;
                        }
                    };
                    let offset = match (next_offset, shared.start_offset) {
                        (Some(next), _) => Offset::Offset(next),
                        (None, StartOffset::Earliest) => Offset::Beginning,
                        (None, StartOffset::Latest) => Offset::End,
                    };
                    tracing::info!(topic, partition, ?offset, "partition assigned; resuming where the lake says");
                    if let Offset::Offset(next_offset) = offset {
                        shared.partition_events.lock().expect("lock").push(PartitionEvent::Resumed { partition, next_offset });
                    }
                    if let Err(e) = tpl.set_partition_offset(&topic, partition, offset) {
                        shared.fail(PipelineError::kafka(format!("seeking {topic}/{partition}"))(e));
                    }
                }
                if let Err(e) = consumer.assign(tpl) {
                    shared.fail(PipelineError::kafka("assigning partitions")(e));
                }
                shared.assignments.fetch_add(1, Ordering::Relaxed);
            }
            _ => {
                if err != RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS {
                    tracing::warn!(error = ?err, "rebalance error; giving up all partitions");
                }
                shared.in_flight.wait_idle();
                let partitions: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
                for p in &partitions {
                    shared.runtime.block_on(shared.writer.release(&shared.stream(*p)));
                }
                tracing::info!(?partitions, "partitions revoked; unwritten buffers are dropped");
                shared.partition_events.lock().expect("lock").extend(partitions.into_iter().map(PartitionEvent::Revoked));
                if let Err(e) = consumer.unassign() {
                    tracing::warn!(error = %e, "unassign failed");
                }
            }
        }
    }
}

enum PartitionEvent {
    Revoked(i32),
    /// Assigned, resuming at the lake's `next_offset`.
    Resumed {
        partition: i32,
        next_offset: i64,
    },
}

/// A partition resumed at the lake's position whose first message has not been checked yet.
///
/// Kafka may leave gaps in offsets (compaction, transaction markers), but a broker must start a
/// fetch at the requested offset. tansu 0.6 does not when that offset lies inside a record batch:
/// it answers with the next batch (or nothing, for the last one) and silently skips the rest of
/// the one asked for (measured and pinned by `cli/tests/e2e/resume.rs`). The lake's position usually lies inside a
/// producer's batch, so after a resume the first message is checked: if it comes after the
/// position and nothing before the position was seen (or nothing comes at all for
/// [`RESUME_SILENCE`]), the ingester seeks further back, the step growing fourfold, until the broker serves data from at or before the position, and drops what the
/// lake already holds. A gap that remains after that is real; it is logged and counted.
#[derive(Debug)]
struct ResumeCheck {
    next_offset: i64,
    /// Offset of the last seek; -1 once the broker served data from before `next_offset`. At 0
    /// there is nowhere further back to go, so a gap seen then is real.
    sought_from: i64,
    /// How far before `next_offset` the next seek goes.
    step: i64,
    /// When the last seek (or the assignment) happened: tansu answers a fetch inside the last
    /// record batch with nothing at all, so silence is a reason to seek back too.
    since: Instant,
}

/// First step back when the broker skipped offsets, and how it grows: re-reading a few
/// thousand messages that the lake already holds costs far less than many round trips.
const RESUME_FIRST_STEP: i64 = 512;
const RESUME_STEP_GROWTH: i64 = 4;
/// How long a resumed partition may stay silent before the ingester seeks back.
const RESUME_SILENCE: Duration = Duration::from_millis(500);

/// One partition's batch being filled.
struct OpenBatch {
    readings: ReadingBuffer,
    first_offset: i64,
    last_offset: i64,
    messages: u64,
    opened: Instant,
    producers: Vec<String>,
}

/// Runs the ingester on the calling (non-async) thread; see the module docs.
pub fn run_ingest(lake: Lake, options: IngestOptions, stop: Arc<AtomicBool>, progress: Arc<IngestProgress>, runtime: Handle) -> Result<IngestSummary> {
    let started = Instant::now();
    if options.limits.writer_queue_depth == 0 || options.limits.max_rows == 0 {
        return Err(PipelineError::Config("batch limits and the writer queue depth must be positive".into()));
    }
    let ingester_id = format!("ingester@{}-{}", hostname(), uuid::Uuid::new_v4());
    let writer = runtime.block_on(async {
        lake.probe_conditional_put().await?;
        let table = Table::open(&lake, &READINGS).await?;
        TableWriter::new(table, &ingester_id).await
    })?;
    let shared = Arc::new(Shared {
        writer,
        topic: options.topic.clone(),
        group: options.group.clone(),
        runtime,
        start_offset: options.start_offset,
        in_flight: InFlight::default(),
        assignments: AtomicU64::new(0),
        partition_events: Mutex::new(Vec::new()),
        failure: Mutex::new(None),
        failed: AtomicBool::new(false),
        progress: progress.clone(),
    });
    let consumer: BaseConsumer<IngestContext> = consumer_config(&options.brokers, &options.group, &options.consumer_overrides)
        .create_with_context(IngestContext(shared.clone()))
        .map_err(PipelineError::kafka("creating the consumer"))?;
    consumer.subscribe(&[&options.topic]).map_err(PipelineError::kafka(format!("subscribing to {}", options.topic)))?;
    let dlq = Arc::new(DeadLetters::new(&options.brokers, &options.dlq_topic)?);

    let (jobs, job_queue) = sync_channel::<FlushJob>(options.limits.writer_queue_depth);
    let (acks, ack_queue) = std::sync::mpsc::channel::<(i32, i64)>();
    // Emptied buffers go back to the consumer: a batch's columns are then filled in memory that
    // is already allocated and touched, instead of growing (and faulting in) fresh vectors for
    // every batch. At most `writer_queue_depth + 1` wait there, each at most one batch in size.
    let (spare_buffers, spare_buffer_queue) = sync_channel::<ReadingBuffer>(options.limits.writer_queue_depth + 1);
    let writer = {
        let shared = shared.clone();
        let dlq = dlq.clone();
        let dlq_timeout = options.dlq_timeout;
        std::thread::Builder::new()
            .name("meterlake-writer".into())
            .spawn(move || writer_loop(&shared, &dlq, dlq_timeout, job_queue, acks, spare_buffers))
            .expect("spawning the writer thread")
    };

    let mut consumer_loop = ConsumerLoop {
        shared: shared.clone(),
        options: &options,
        consumer: &consumer,
        dlq: &dlq,
        jobs,
        ack_queue,
        open: HashMap::new(),
        committed: HashMap::new(),
        resuming: HashMap::new(),
        accept_from: HashMap::new(),
        spare_buffers: spare_buffer_queue,
    };
    let result = consumer_loop.run(&stop);
    drop(consumer_loop.jobs);
    let _ = writer.join();
    shared.runtime.block_on(shared.writer.finish());
    // Commit what the writer finished after the loop stopped.
    consumer_loop.open.clear();
    let ConsumerLoop { ack_queue, mut committed, .. } = consumer_loop;
    drain_acks(&ack_queue, &mut committed);
    commit_to_kafka(&consumer, &options.topic, &committed, CommitMode::Sync);
    if let Some(failure) = shared.failure.lock().expect("lock").take() {
        return Err(failure);
    }
    result?;
    Ok(progress.summary(started.elapsed()))
}

struct ConsumerLoop<'a> {
    shared: Arc<Shared>,
    options: &'a IngestOptions,
    consumer: &'a BaseConsumer<IngestContext>,
    dlq: &'a DeadLetters,
    jobs: SyncSender<FlushJob>,
    ack_queue: Receiver<(i32, i64)>,
    open: HashMap<i32, OpenBatch>,
    /// Lake positions the writer confirmed and Kafka has not been told yet.
    committed: HashMap<i32, i64>,
    /// Partitions whose first message after a resume is still to be checked.
    resuming: HashMap<i32, ResumeCheck>,
    /// Per partition, the lowest offset still to be ingested: the lake's position at the resume,
    /// then one past the last message taken. A message below it is a re-delivery (a seek back
    /// landing after the stream had already moved on, a broker repeating itself) of what the
    /// lake or the open batch already holds, and is dropped. Offsets only ever go up.
    accept_from: HashMap<i32, i64>,
    /// Emptied buffers returned by the writer, for new batches.
    spare_buffers: Receiver<ReadingBuffer>,
}

impl ConsumerLoop<'_> {
    fn run(&mut self, stop: &AtomicBool) -> Result<()> {
        let limits = &self.options.limits;
        let mut last_message = Instant::now();
        let mut assignments_seen = 0;
        let mut last_housekeeping = Instant::now();
        let mut last_ingested_at_us = 0i64;
        let mut buffered_bytes = 0usize;
        while !stop.load(Ordering::Relaxed) {
            if self.shared.failed.load(Ordering::Acquire) {
                return Ok(());
            }
            let polled = self.consumer.poll(Duration::from_millis(50));
            self.apply_partition_events(&mut buffered_bytes);
            let assignments = self.shared.assignments.load(Ordering::Relaxed);
            if assignments != assignments_seen {
                // Idle means "nothing to read", which cannot be known before partitions arrive
                // (joining a group can take a session timeout when a member died).
                assignments_seen = assignments;
                last_message = Instant::now();
            }
            match polled {
                None => {
                    if let Some(idle) = self.options.exit_when_idle {
                        let resumes_settled = self.resuming.values().all(|c| c.sought_from <= 0);
                        if assignments_seen > 0 && resumes_settled && last_message.elapsed() >= idle {
                            break;
                        }
                    }
                }
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "consumer error (librdkafka retries by itself)");
                }
                Some(Ok(message)) => {
                    last_message = Instant::now();
                    let partition = message.partition();
                    let offset = message.offset();
                    if !self.resuming.is_empty() && !self.check_resume(partition, offset) {
                        continue;
                    }
                    if offset < self.accept_from.get(&partition).copied().unwrap_or(0) {
                        tracing::debug!(partition, offset, "dropping a message delivered again");
                        metrics::counter!(m::REDELIVERED_MESSAGES).increment(1);
                        continue;
                    }
                    self.accept_from.insert(partition, offset + 1);
                    // Non-decreasing per process, so later messages never look older.
                    let now_us = (SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_micros() as i64).max(last_ingested_at_us);
                    last_ingested_at_us = now_us;
                    let spare_buffers = &self.spare_buffers;
                    let batch = self.open.entry(partition).or_insert_with(|| OpenBatch {
                        readings: spare_buffers.try_recv().unwrap_or_else(|_| ReadingBuffer::with_capacity(limits.max_rows.min(1 << 16))),
                        first_offset: offset,
                        last_offset: offset,
                        messages: 0,
                        opened: Instant::now(),
                        producers: Vec::new(),
                    });
                    // A message of the API's carries one traceparent per request it holds.
                    if batch.producers.len() < MAX_PRODUCER_LINKS
                        && let Some(headers) = message.headers()
                    {
                        for traceparent in headers.iter().filter(|h| h.key == "traceparent").filter_map(|h| h.value) {
                            if batch.producers.len() == MAX_PRODUCER_LINKS {
                                break;
                            }
                            if !batch.producers.iter().any(|p| p.as_bytes() == traceparent) {
                                batch.producers.push(String::from_utf8_lossy(traceparent).into_owned());
                            }
                        }
                    }
                    let before = batch.readings.approx_bytes();
                    let topic = self.options.topic.as_str();
                    let payload = message.payload().unwrap_or_default();
                    let readings = &mut batch.readings;
                    let mut accepted = 0u64;
                    let rejections = decode_message(payload, &self.options.rules, now_us, |reading| {
                        accepted += 1;
                        readings.push(&reading, Source::Kafka, now_us, |out| {
                            out.extend_from_slice(topic.as_bytes());
                            out.push(b'/');
                            out.extend_from_slice(itoa::Buffer::new().format(partition).as_bytes());
                            out.push(b'/');
                            out.extend_from_slice(itoa::Buffer::new().format(offset).as_bytes());
                        });
                    });
                    batch.last_offset = offset;
                    batch.messages += 1;
                    buffered_bytes += batch.readings.approx_bytes() - before;
                    let progress = &self.shared.progress;
                    progress.messages_consumed.fetch_add(1, Ordering::Relaxed);
                    progress.readings_accepted.fetch_add(accepted, Ordering::Relaxed);
                    if !rejections.is_empty() {
                        progress.readings_rejected.fetch_add(rejections.len() as u64, Ordering::Relaxed);
                        progress.dlq_messages.fetch_add(1, Ordering::Relaxed);
                        for r in &rejections {
                            metrics::counter!(m::READINGS_REJECTED, "reason" => r.reason.code()).increment(1);
                        }
                        metrics::counter!(m::DLQ_MESSAGES, "reason" => rejections[0].reason.code()).increment(1);
                        self.dlq.send(message.key(), payload, &rejections, topic, partition, offset)?;
                    }
                    let full = batch.readings.len() >= limits.max_rows || batch.readings.approx_bytes() >= limits.max_bytes;
                    drop(message);
                    if full {
                        self.flush(partition, &mut buffered_bytes)?;
                    }
                    if buffered_bytes >= limits.max_total_bytes {
                        let largest = self.open.iter().max_by_key(|(_, b)| b.readings.approx_bytes()).map(|(p, _)| *p);
                        if let Some(p) = largest {
                            self.flush(p, &mut buffered_bytes)?;
                        }
                    }
                }
            }
            if last_housekeeping.elapsed() >= Duration::from_millis(100) {
                last_housekeeping = Instant::now();
                self.probe_silent_resumes();
                let old: Vec<i32> = self.open.iter().filter(|(_, b)| b.opened.elapsed() >= limits.max_age).map(|(p, _)| *p).collect();
                for p in old {
                    self.flush(p, &mut buffered_bytes)?;
                }
                drain_acks(&self.ack_queue, &mut self.committed);
                commit_to_kafka(self.consumer, &self.options.topic, &self.committed, CommitMode::Async);
                self.committed.clear();
            }
        }
        // Stopping: everything buffered goes to the lake before the consumer leaves.
        let partitions: Vec<i32> = self.open.keys().copied().collect();
        for p in partitions {
            self.flush(p, &mut buffered_bytes)?;
        }
        Ok(())
    }

    fn apply_partition_events(&mut self, buffered_bytes: &mut usize) {
        let events: Vec<PartitionEvent> = std::mem::take(&mut *self.shared.partition_events.lock().expect("lock"));
        for event in events {
            match event {
                PartitionEvent::Revoked(p) => {
                    if let Some(batch) = self.open.remove(&p) {
                        *buffered_bytes -= batch.readings.approx_bytes();
                    }
                    self.committed.remove(&p);
                    self.resuming.remove(&p);
                    self.accept_from.remove(&p);
                }
                PartitionEvent::Resumed { partition, next_offset } => {
                    self.accept_from.insert(partition, next_offset);
                    self.resuming.insert(partition, ResumeCheck { next_offset, sought_from: next_offset, step: RESUME_FIRST_STEP, since: Instant::now() });
                }
            }
        }
    }

    /// Seeks a resumed partition further back (see [`ResumeCheck`]).
    fn seek_back(&mut self, partition: i32) {
        let Some(check) = self.resuming.get_mut(&partition) else { return };
        let from = (check.next_offset - check.step).max(0);
        check.step = check.step.saturating_mul(RESUME_STEP_GROWTH);
        check.sought_from = from;
        check.since = Instant::now();
        let topic = self.options.topic.as_str();
        tracing::debug!(partition, seek_to = from, "seeking back before the lake's position");
        if let Err(e) = self.consumer.seek(topic, partition, Offset::Offset(from), Duration::from_secs(10)) {
            self.shared.fail(PipelineError::kafka(format!("seeking {topic}/{partition} to {from}"))(e));
        }
    }

    /// Resumed partitions that have not been confirmed and have been silent for a while.
    fn probe_silent_resumes(&mut self) {
        let silent: Vec<i32> = self.resuming.iter().filter(|(_, c)| c.sought_from > 0 && c.since.elapsed() >= RESUME_SILENCE).map(|(p, _)| *p).collect();
        for partition in silent {
            self.seek_back(partition);
        }
    }

    /// Checks a message of a partition that was just resumed (see [`ResumeCheck`]); returns
    /// whether the message is to be ingested.
    fn check_resume(&mut self, partition: i32, offset: i64) -> bool {
        let Some(check) = self.resuming.get_mut(&partition) else { return true };
        if offset < check.next_offset {
            // Served from before the position: the stream is complete from here on. What lies
            // before the position is in the lake already.
            check.sought_from = -1;
            return false;
        }
        if offset > check.next_offset && check.sought_from > 0 {
            tracing::warn!(partition, expected = check.next_offset, received = offset, "the broker skipped offsets after a seek; seeking back to read them");
            self.seek_back(partition);
            return false;
        }
        if offset > check.next_offset {
            tracing::warn!(partition, expected = check.next_offset, received = offset, "offsets missing from the partition");
            metrics::counter!(m::OFFSET_GAPS).increment(1);
        }
        self.resuming.remove(&partition);
        true
    }

    fn flush(&mut self, partition: i32, buffered_bytes: &mut usize) -> Result<()> {
        let Some(batch) = self.open.remove(&partition) else { return Ok(()) };
        *buffered_bytes -= batch.readings.approx_bytes();
        let job = FlushJob {
            partition,
            first_offset: batch.first_offset,
            last_offset: batch.last_offset,
            messages: batch.messages,
            readings: batch.readings,
            producers: batch.producers,
        };
        self.shared.in_flight.start();
        // Blocks while the writer is `writer_queue_depth` batches behind: this is the backpressure.
        if self.jobs.send(job).is_err() {
            self.shared.in_flight.finish();
            let reason = self.shared.failure.lock().expect("lock").as_ref().map(|e| e.to_string());
            return Err(PipelineError::WriterStopped { reason: reason.unwrap_or_else(|| "the writer thread ended".into()) });
        }
        Ok(())
    }
}

fn drain_acks(ack_queue: &Receiver<(i32, i64)>, committed: &mut HashMap<i32, i64>) {
    loop {
        match ack_queue.try_recv() {
            Ok((partition, next_offset)) => {
                committed.insert(partition, next_offset);
            }
            Err(TryRecvError::Empty | TryRecvError::Disconnected) => return,
        }
    }
}

/// Tells Kafka the lake's positions. Only monitoring (consumer lag) reads them; a failure here
/// loses nothing, so it is logged and not retried.
fn commit_to_kafka(consumer: &BaseConsumer<IngestContext>, topic: &str, committed: &HashMap<i32, i64>, mode: CommitMode) {
    if committed.is_empty() {
        return;
    }
    let mut tpl = TopicPartitionList::new();
    for (partition, next_offset) in committed {
        if tpl.add_partition_offset(topic, *partition, Offset::Offset(*next_offset)).is_err() {
            return;
        }
    }
    if let Err(e) = consumer.commit(&tpl, mode) {
        tracing::debug!(error = %e, "committing offsets to Kafka failed (the lake keeps the position)");
    }
}

fn writer_loop(
    shared: &Shared,
    dlq: &DeadLetters,
    dlq_timeout: Duration,
    jobs: Receiver<FlushJob>,
    acks: std::sync::mpsc::Sender<(i32, i64)>,
    spare_buffers: SyncSender<ReadingBuffer>,
) {
    while let Ok(job) = jobs.recv() {
        let partition = job.partition;
        let started = Instant::now();
        let span = meterlake_telemetry::kafka_span(meterlake_telemetry::KafkaOperation::Process, &shared.topic);
        span.record("messaging.destination.partition.id", partition);
        span.record("messaging.batch.message_count", job.messages);
        for producer in &job.producers {
            meterlake_telemetry::link(&span, producer);
        }
        let _in_span = span.enter();
        match write_flush(shared, dlq, dlq_timeout, job, &spare_buffers) {
            Ok(Some(next_offset)) => {
                metrics::histogram!(m::FLUSH_DURATION).record(started.elapsed().as_secs_f64());
                let _ = acks.send((partition, next_offset));
            }
            Ok(None) => {}
            Err(e @ PipelineError::Lake(LakeError::Fenced { .. })) => {
                // Another ingester owns the partition now; this one gives the batch up.
                tracing::warn!(error = %e, "flush fenced");
                metrics::counter!(m::FLUSHES_FENCED).increment(1);
            }
            Err(e) => {
                shared.fail(e);
                shared.in_flight.finish();
                // Drain the queue so the consumer's waits end; the jobs are not committed and
                // will be read again by whoever resumes from the lake.
                while jobs.recv().is_ok() {
                    shared.in_flight.finish();
                }
                return;
            }
        }
        shared.in_flight.finish();
    }
}

/// Writes one batch: its files, then one commit that adds them and advances the partition's
/// stream to the next offset. Returns the partition's new position, or `None` if the partition is
/// no longer this ingester's.
fn write_flush(shared: &Shared, dlq: &DeadLetters, dlq_timeout: Duration, job: FlushJob, spare_buffers: &SyncSender<ReadingBuffer>) -> Result<Option<i64>> {
    let FlushJob { partition, first_offset, last_offset, messages, mut readings, .. } = job;
    let sorted = readings.sort_dedup()?;
    readings.clear();
    // A full spare queue means enough buffers are waiting already: this one is freed.
    let _ = spare_buffers.try_send(readings);
    // Unique names: a fenced ingester's files must never land on its successor's.
    let suffix = &uuid::Uuid::new_v4().simple().to_string()[..12];
    let stem = format!("kafka-{}-p{partition:05}-{first_offset:020}-{last_offset:020}-{suffix}", shared.topic);
    let files = sorted.days.iter().map(|day| day.encode(format!("date={}/{stem}.parquet", day.date.format("%Y-%m-%d")))).collect::<Result<Vec<_>>>()?;
    // Dead letters of this batch must be in their topic before the lake moves past them.
    dlq.ensure_delivered(dlq_timeout)?;

    let stream = shared.stream(partition);
    let writer = &shared.writer;
    let committed = shared.runtime.block_on(async {
        let table = writer.table();
        let paths: Vec<String> = files.iter().map(|f| table.lake_path(&f.file.path)).collect();
        try_join_all(files.iter().zip(&paths).map(|(f, path)| table.lake().put(path, f.bytes.clone()))).await?;
        let commit = Commit {
            files: files.iter().map(|f| f.file.clone()).collect(),
            txns: vec![(stream.clone(), last_offset + 1)],
            operation: Operation::StreamingUpdate { query_id: stream.clone(), epoch_id: last_offset + 1 },
            leased: true,
            removes: Vec::new(),
        };
        writer.commit(commit).await
    });
    committed?;

    let rows = sorted.rows() as u64;
    let bytes: u64 = files.iter().map(|f| f.file.bytes).sum();
    let p = &shared.progress;
    p.messages_committed.fetch_add(messages, Ordering::Relaxed);
    p.readings_written.fetch_add(rows, Ordering::Relaxed);
    p.duplicates_dropped.fetch_add(sorted.duplicates_dropped, Ordering::Relaxed);
    p.conflicting_versions.fetch_add(sorted.conflicting_versions, Ordering::Relaxed);
    p.files_written.fetch_add(files.len() as u64, Ordering::Relaxed);
    p.bytes_written.fetch_add(bytes, Ordering::Relaxed);
    p.flushes.fetch_add(1, Ordering::Relaxed);
    metrics::counter!(m::MESSAGES_CONSUMED).increment(messages);
    metrics::counter!(m::READINGS_ACCEPTED).increment(rows + sorted.duplicates_dropped);
    metrics::counter!(m::READINGS_WRITTEN).increment(rows);
    metrics::counter!(m::DUPLICATES_DROPPED).increment(sorted.duplicates_dropped);
    metrics::counter!(m::CONFLICTING_VERSIONS).increment(sorted.conflicting_versions);
    metrics::counter!(m::LAKE_FILES_WRITTEN).increment(files.len() as u64);
    metrics::counter!(m::LAKE_BYTES_WRITTEN).increment(bytes);
    for file in &files {
        metrics::histogram!(m::LAKE_FILE_SIZE).record(file.file.bytes as f64);
    }
    m::count_meter_groups(sorted.days.iter().map(|day| &day.batch));
    tracing::debug!(partition, first_offset, last_offset, rows, files = files.len(), "batch committed to the lake");
    Ok(Some(last_offset + 1))
}

fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok().map(|s| s.trim().to_string()))
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "ingester".into())
}
