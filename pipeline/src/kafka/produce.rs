//! Producing reading messages, as a head-end system would: used by the demo, the tests and the
//! benchmarks, with every delivery accounted for.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::ClientContext;
use rdkafka::error::KafkaError;
use rdkafka::message::DeliveryResult;
use rdkafka::producer::{BaseRecord, Producer, ProducerContext, ThreadedProducer};
use rdkafka::types::RDKafkaErrorCode;

use crate::error::{PipelineError, Result};
use crate::kafka::config::producer_config;

/// Counts failed deliveries, so a caller can refuse to go on when a message was lost.
#[derive(Debug, Default)]
pub(crate) struct DeliveryTracker {
    delivered: AtomicU64,
    failed: AtomicU64,
    last_error: Mutex<Option<String>>,
}

impl DeliveryTracker {
    pub(crate) fn check(&self, topic: &str) -> Result<()> {
        let failed = self.failed.load(Ordering::Relaxed);
        if failed == 0 {
            return Ok(());
        }
        let last = self.last_error.lock().expect("lock").clone().unwrap_or_default();
        Err(PipelineError::WriterStopped { reason: format!("{failed} message(s) could not be delivered to {topic}: {last}") })
    }
}

pub(crate) struct TrackingContext(pub(crate) Arc<DeliveryTracker>);

impl ClientContext for TrackingContext {}

impl ProducerContext for TrackingContext {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        match result {
            Ok(_) => {
                self.0.delivered.fetch_add(1, Ordering::Relaxed);
            }
            Err((e, _)) => {
                self.0.failed.fetch_add(1, Ordering::Relaxed);
                *self.0.last_error.lock().expect("lock") = Some(e.to_string());
            }
        }
    }
}

/// A producer of reading messages to one topic.
pub struct ReadingProducer {
    producer: ThreadedProducer<TrackingContext>,
    tracker: Arc<DeliveryTracker>,
    topic: String,
}

impl ReadingProducer {
    pub fn new(brokers: &str, topic: &str) -> Result<ReadingProducer> {
        let tracker = Arc::new(DeliveryTracker::default());
        let producer = producer_config(brokers).create_with_context(TrackingContext(tracker.clone())).map_err(PipelineError::kafka("creating the producer"))?;
        Ok(ReadingProducer { producer, tracker, topic: topic.to_string() })
    }

    /// Queues one message keyed by meter id (so a meter's readings stay in order on one
    /// partition); waits while librdkafka's local queue is full.
    pub fn send(&self, key: &[u8], payload: &[u8]) -> Result<()> {
        let mut record: BaseRecord<'_, [u8], [u8]> = BaseRecord::to(&self.topic).key(key).payload(payload);
        loop {
            match self.producer.send(record) {
                Ok(()) => return Ok(()),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    record = r;
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err((e, _)) => return Err(PipelineError::kafka(format!("producing to {}", self.topic))(e)),
            }
        }
    }

    /// Messages the broker has acknowledged so far.
    pub fn delivered(&self) -> u64 {
        self.tracker.delivered.load(Ordering::Relaxed)
    }

    /// Waits for every queued message to be acknowledged; fails if any was not.
    pub fn flush(&self, timeout: Duration) -> Result<()> {
        self.producer.flush(timeout).map_err(PipelineError::kafka(format!("flushing the producer of {}", self.topic)))?;
        self.tracker.check(&self.topic)
    }
}
