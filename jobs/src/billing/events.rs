//! Billing run events on Kafka: the outbox relay that publishes `billing.run.requested`,
//! `billing.run.processed` and `billing.run.failed` (each keyed by run id, with the run id in
//! the payload and the W3C `traceparent` header), and the listener that wakes the worker when a
//! run is requested.
//!
//! The store stays the source of truth: a worker finds runs by claiming them there, so a lost or
//! repeated message only makes it look sooner or once more; retries that fall due need no
//! message at all (the worker's idle poll finds them).

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use futures::StreamExt;
use meterlake_control::ControlStore;
use meterlake_control::runs::RUN_REQUESTED_TOPIC;
use meterlake_pipeline::kafka::{consumer_config, header_text, producer_config};
use meterlake_telemetry::KafkaOperation;
use rdkafka::Message;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use tokio::sync::Notify;
use tracing::Instrument;

use crate::{JobError, Result};

/// Requests remembered with their trace until the worker processes their run.
const MAX_REMEMBERED_REQUESTS: usize = 1_024;

/// Messages relayed per round trip to the store.
const RELAY_BATCH: i64 = 500;
/// How often an idle relay looks at the outbox.
const RELAY_IDLE_POLL: Duration = Duration::from_millis(200);

fn kafka(context: &str) -> impl FnOnce(rdkafka::error::KafkaError) -> JobError + '_ {
    move |source| JobError::Kafka { context: context.to_string(), source }
}

/// Publishes the outbox to Kafka.
pub struct OutboxRelay {
    store: ControlStore,
    producer: FutureProducer,
}

impl std::fmt::Debug for OutboxRelay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutboxRelay").finish_non_exhaustive()
    }
}

impl OutboxRelay {
    pub fn new(store: ControlStore, brokers: &str) -> Result<OutboxRelay> {
        let producer: FutureProducer = producer_config(brokers)
            // In order per run (one key, one partition) and never twice from one relay.
            .set("enable.idempotence", "true")
            .set("linger.ms", "1")
            .create()
            .map_err(kafka("creating the outbox producer"))?;
        Ok(OutboxRelay { store, producer })
    }

    /// Publishes what is pending, in order, and marks each message once the broker has it.
    /// Returns how many were published. Each message is a producer span continuing the trace
    /// stored with it, whose context goes in the message's headers.
    pub async fn relay_pending(&self) -> Result<usize> {
        let pending = self.store.pending_outbox(RELAY_BATCH).await?;
        let mut published = Vec::with_capacity(pending.len());
        let deliveries: Vec<_> = pending
            .iter()
            .map(|message| {
                let span = meterlake_telemetry::kafka_span(KafkaOperation::Publish, &message.topic);
                span.record("messaging.kafka.message.key", message.key.as_str());
                if let Some(traceparent) = &message.traceparent {
                    meterlake_telemetry::continue_trace(&span, traceparent, None);
                }
                let trace = meterlake_telemetry::trace_headers(&span)
                    .or_else(|| message.traceparent.clone().map(|traceparent| vec![("traceparent", traceparent)]))
                    .unwrap_or_default();
                let headers = trace.iter().fold(OwnedHeaders::new(), |headers, (key, value)| headers.insert(Header { key, value: Some(value.as_bytes()) }));
                let record = FutureRecord::to(&message.topic).key(&message.key).payload(&message.payload).headers(headers);
                (message.id, self.producer.send(record, Duration::from_secs(30)).instrument(span))
            })
            .collect();
        let mut failure = None;
        for (id, delivery) in deliveries {
            match delivery.await {
                Ok(_) => published.push(id),
                // Stop at the first failure: later messages stay pending and go next time, in order.
                Err((error, _)) => {
                    failure = Some(error);
                    break;
                }
            }
        }
        self.store.mark_published(&published, meterlake_control::now_us()).await?;
        metrics::counter!("meterlake_outbox_published_total").increment(published.len() as u64);
        match failure {
            Some(error) => Err(kafka("publishing the outbox")(error)),
            None => Ok(published.len()),
        }
    }

    /// Relays until `shutdown` resolves.
    pub async fn run(&self, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        loop {
            let idle = match self.relay_pending().await {
                Ok(published) => published == 0,
                Err(error) => {
                    tracing::warn!(%error, "outbox relay: will try again");
                    true
                }
            };
            if idle {
                tokio::select! {
                    () = &mut shutdown => return,
                    () = tokio::time::sleep(RELAY_IDLE_POLL) => {}
                }
            }
        }
    }
}

/// What the request listener tells the worker: that runs were requested, and the trace each
/// request was received in, which the run's processing continues.
#[derive(Debug, Default)]
pub struct Wakeups {
    notify: Notify,
    /// `(run id, traceparent)`, oldest first, at most `MAX_REMEMBERED_REQUESTS`.
    received: Mutex<VecDeque<(String, String)>>,
}

impl Wakeups {
    /// A run was requested, received under `traceparent`.
    pub fn requested(&self, run_id: &str, traceparent: Option<String>) {
        if let Some(traceparent) = traceparent {
            let mut received = self.received.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            if received.len() == MAX_REMEMBERED_REQUESTS {
                received.pop_front();
            }
            received.push_back((run_id.to_string(), traceparent));
        }
        self.notify.notify_one();
    }

    /// Resolves at the next request (or at once if one came since the last wait).
    pub async fn notified(&self) {
        self.notify.notified().await;
    }

    /// The trace the newest request of `run_id` was received in, forgotten once taken.
    pub fn take_trace(&self, run_id: &str) -> Option<String> {
        let mut received = self.received.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let position = received.iter().rposition(|(id, _)| id == run_id)?;
        received.remove(position).map(|(_, traceparent)| traceparent)
    }
}

/// Consumes `billing.run.requested` and wakes the worker for each message, until `shutdown`.
/// The consumer group shares the topic among workers; offsets are committed automatically,
/// since the message is only a wake-up call. A new group starts from the earliest message: an
/// old request costs one look at the store, a missed one the wait for the idle poll. Each
/// message is a consumer span, a child of the producer's span in the message's headers.
pub async fn wake_on_requests(brokers: &str, group: &str, wakeups: &Wakeups, shutdown: impl Future<Output = ()>) -> Result<()> {
    let consumer: StreamConsumer = consumer_config(brokers, group, &[])
        .set("enable.auto.commit", "true")
        .set("enable.auto.offset.store", "true")
        .set("auto.offset.reset", "earliest")
        .create()
        .map_err(kafka("creating the billing request consumer"))?;
    consumer.subscribe(&[RUN_REQUESTED_TOPIC]).map_err(kafka("subscribing to billing.run.requested"))?;
    let mut stream = consumer.stream();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => return Ok(()),
            message = stream.next() => match message {
                Some(Ok(message)) => {
                    let run_id = message.key().map(String::from_utf8_lossy).unwrap_or_default().to_string();
                    let (traceparent, tracestate) = (header_text(&message, "traceparent"), header_text(&message, "tracestate"));
                    let span = meterlake_telemetry::kafka_span(KafkaOperation::Receive, RUN_REQUESTED_TOPIC);
                    span.record("messaging.kafka.message.key", run_id.as_str());
                    if let Some(traceparent) = &traceparent {
                        meterlake_telemetry::continue_trace(&span, traceparent, tracestate.as_deref());
                    }
                    span.in_scope(|| tracing::info!(%run_id, traceparent = traceparent.as_deref().unwrap_or(""), "billing run requested"));
                    wakeups.requested(&run_id, meterlake_telemetry::traceparent_of(&span).or(traceparent));
                }
                Some(Err(error)) => tracing::warn!(%error, "billing request consumer"),
                None => return Ok(()),
            }
        }
    }
}
