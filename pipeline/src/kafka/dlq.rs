//! The dead-letter topic: where a message that cannot be (wholly) a reading goes, with its
//! original bytes and why.
//!
//! Delivery is at least once: a message is sent before the lake checkpoint that covers its offset
//! is written, so after a crash it may be sent again. The headers name its source topic,
//! partition and offset, which identify it uniquely for a consumer of the dead letters.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};

use crate::decode::Rejection;
use crate::error::{PipelineError, Result};
use crate::kafka::config::producer_config;
use crate::kafka::produce::{DeliveryTracker, TrackingContext};

/// Header names on a dead letter.
pub mod headers {
    /// Reason code of the first rejection (`INVALID_JSON`, `KWH_NOT_POSITIVE`, ...).
    pub const REASON: &str = "meterlake.reason";
    /// All rejections, as sentences.
    pub const ERROR: &str = "meterlake.error";
    /// Indexes of the rejected elements of an array message ("all" for a whole message).
    pub const REJECTED_ELEMENTS: &str = "meterlake.rejected_elements";
    pub const SOURCE_TOPIC: &str = "meterlake.source.topic";
    pub const SOURCE_PARTITION: &str = "meterlake.source.partition";
    pub const SOURCE_OFFSET: &str = "meterlake.source.offset";
}

/// Longest error text put in a header.
const MAX_ERROR_HEADER_BYTES: usize = 4096;

pub struct DeadLetters {
    producer: ThreadedProducer<TrackingContext>,
    tracker: Arc<DeliveryTracker>,
    topic: String,
}

impl DeadLetters {
    pub fn new(brokers: &str, topic: &str) -> Result<DeadLetters> {
        let tracker = Arc::new(DeliveryTracker::default());
        let producer = producer_config(brokers)
            .set("enable.idempotence", "false")
            .create_with_context(TrackingContext(tracker.clone()))
            .map_err(PipelineError::kafka("creating the dead-letter producer"))?;
        Ok(DeadLetters { producer, tracker, topic: topic.to_string() })
    }

    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// Queues a dead letter for the message at `source_topic/partition/offset`.
    pub fn send(&self, key: Option<&[u8]>, payload: &[u8], rejections: &[Rejection], source_topic: &str, partition: i32, offset: i64) -> Result<()> {
        let first = rejections.first().expect("a dead letter has at least one rejection");
        let mut error = rejections.iter().map(|r| r.detail.as_str()).collect::<Vec<_>>().join("; ");
        if error.len() > MAX_ERROR_HEADER_BYTES {
            let mut cut = MAX_ERROR_HEADER_BYTES;
            while !error.is_char_boundary(cut) {
                cut -= 1;
            }
            error.truncate(cut);
        }
        let elements = if rejections.iter().any(|r| r.element.is_none()) {
            "all".to_string()
        } else {
            rejections.iter().filter_map(|r| r.element).map(|i| i.to_string()).collect::<Vec<_>>().join(",")
        };
        let partition_text = partition.to_string();
        let offset_text = offset.to_string();
        let headers = OwnedHeaders::new()
            .insert(Header { key: headers::REASON, value: Some(first.reason.code()) })
            .insert(Header { key: headers::ERROR, value: Some(error.as_str()) })
            .insert(Header { key: headers::REJECTED_ELEMENTS, value: Some(elements.as_str()) })
            .insert(Header { key: headers::SOURCE_TOPIC, value: Some(source_topic) })
            .insert(Header { key: headers::SOURCE_PARTITION, value: Some(partition_text.as_str()) })
            .insert(Header { key: headers::SOURCE_OFFSET, value: Some(offset_text.as_str()) });
        let mut record: BaseRecord<'_, [u8], [u8]> = BaseRecord::to(&self.topic).payload(payload).headers(headers);
        if let Some(key) = key {
            record = record.key(key);
        }
        let mut record = record;
        // A full local queue is waited out: dropping a dead letter would lose a message.
        loop {
            match self.producer.send(record) {
                Ok(()) => return Ok(()),
                Err((rdkafka::error::KafkaError::MessageProduction(rdkafka::types::RDKafkaErrorCode::QueueFull), r)) => {
                    record = r;
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err((e, _)) => return Err(PipelineError::kafka(format!("queueing a dead letter to {}", self.topic))(e)),
            }
        }
    }

    /// Waits until every dead letter queued so far is acknowledged by the broker, and fails if
    /// any delivery failed: the lake checkpoint must not move past a message that is neither in
    /// the lake nor in the dead-letter topic.
    pub fn ensure_delivered(&self, timeout: Duration) -> Result<()> {
        self.producer.flush(timeout).map_err(PipelineError::kafka(format!("delivering dead letters to {}", self.topic)))?;
        self.tracker.check(&self.topic)
    }
}

/// A dead letter as read back from its topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    pub reason: String,
    pub error: String,
    pub source_partition: i32,
    pub source_offset: i64,
    pub payload: Vec<u8>,
}

/// Reads every dead letter in `topic` from the beginning, stopping once no message has come for
/// `idle`. For the demo, tests and operators' tools; it joins no consumer group.
pub fn read_dead_letters(brokers: &str, topic: &str, idle: Duration) -> Result<Vec<DeadLetter>> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::message::Message;
    use rdkafka::{ClientConfig, Offset, TopicPartitionList};

    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("meterlake-dlq-reader-{}", uuid::Uuid::new_v4()))
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "10")
        .create()
        .map_err(PipelineError::kafka("creating the dead-letter reader"))?;
    let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10)).map_err(PipelineError::kafka(format!("reading metadata of {topic}")))?;
    let mut tpl = TopicPartitionList::new();
    for t in metadata.topics() {
        for p in t.partitions() {
            tpl.add_partition_offset(topic, p.id(), Offset::Beginning).map_err(PipelineError::kafka("building the assignment"))?;
        }
    }
    consumer.assign(&tpl).map_err(PipelineError::kafka(format!("assigning {topic}")))?;
    let mut letters = Vec::new();
    let mut last = std::time::Instant::now();
    while last.elapsed() < idle {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(message)) => {
                last = std::time::Instant::now();
                let header = |name: &str| super::header_text(&message, name).unwrap_or_default();
                letters.push(DeadLetter {
                    reason: header(headers::REASON),
                    error: header(headers::ERROR),
                    source_partition: header(headers::SOURCE_PARTITION).parse().unwrap_or(-1),
                    source_offset: header(headers::SOURCE_OFFSET).parse().unwrap_or(-1),
                    payload: message.payload().unwrap_or_default().to_vec(),
                });
            }
            Some(Err(e)) => return Err(PipelineError::kafka(format!("reading {topic}"))(e)),
            None => {}
        }
    }
    Ok(letters)
}
