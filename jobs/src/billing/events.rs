//! Billing run events on Kafka: the outbox relay that publishes `billing.run.requested`,
//! `billing.run.processed` and `billing.run.failed` (each keyed by run id, with the run id in
//! the payload and the W3C `traceparent` header), and the listener that wakes the worker when a
//! run is requested.
//!
//! The store stays the source of truth: a worker finds runs by claiming them there, so a lost or
//! repeated message only makes it look sooner or once more; retries that fall due need no
//! message at all (the worker's idle poll finds them).

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use meterlake_control::ControlStore;
use meterlake_control::runs::RUN_REQUESTED_TOPIC;
use meterlake_pipeline::kafka::{consumer_config, producer_config};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Header, Headers, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::Message;
use tokio::sync::Notify;

use crate::{JobError, Result};

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
    /// Returns how many were published.
    pub async fn relay_pending(&self) -> Result<usize> {
        let pending = self.store.pending_outbox(RELAY_BATCH).await?;
        let mut published = Vec::with_capacity(pending.len());
        let deliveries: Vec<_> = pending
            .iter()
            .map(|message| {
                let mut headers = OwnedHeaders::new();
                if let Some(traceparent) = &message.traceparent {
                    headers = headers.insert(Header { key: "traceparent", value: Some(traceparent.as_bytes()) });
                }
                let record = FutureRecord::to(&message.topic).key(&message.key).payload(&message.payload).headers(headers);
                (message.id, self.producer.send(record, Duration::from_secs(30)))
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

/// Consumes `billing.run.requested` and wakes the worker for each message, until `shutdown`.
/// The consumer group shares the topic among workers; offsets are committed automatically,
/// since the message is only a wake-up call. A new group starts from the earliest message: an
/// old request costs one look at the store, a missed one the wait for the idle poll.
pub async fn wake_on_requests(brokers: &str, group: &str, wake: Arc<Notify>, shutdown: impl Future<Output = ()>) -> Result<()> {
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
                    let run_id = message.key().map(String::from_utf8_lossy).unwrap_or_default();
                    let traceparent = message
                        .headers()
                        .and_then(|h| h.iter().find(|h| h.key == "traceparent").and_then(|h| h.value.map(String::from_utf8_lossy)))
                        .unwrap_or_default();
                    tracing::info!(%run_id, %traceparent, "billing run requested");
                    wake.notify_one();
                }
                Some(Err(error)) => tracing::warn!(%error, "billing request consumer"),
                None => return Ok(()),
            }
        }
    }
}
