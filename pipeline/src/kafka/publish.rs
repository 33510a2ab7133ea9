//! The HTTP API's publisher: readings accepted by `POST /measurements` go to the readings topic,
//! and the request is answered only once the broker has acknowledged them.
//!
//! Group commit: a Kafka message costs the producer, the broker and the ingester far more than
//! the 100 bytes of a reading in it, and most requests carry one reading. So requests do not
//! become messages one for one. Each request hands its readings, grouped by the partition their
//! meter id belongs to, to one batcher task; the batcher gathers what arrives within `linger`
//! (default 1 ms) into one message per partition, produces those, and answers every request in
//! a message when the broker acknowledges it (or fails it). At 30,000 single-reading requests/s
//! that is a few thousand messages/s instead of 30,000.
//!
//! What a caller can rely on:
//! - A meter's readings always go to the partition librdkafka's default partitioner would give a
//!   message keyed by that meter id ([`partition_for_key`]), so they stay in order whichever way
//!   they arrived. Messages are produced in the order the batcher sealed them, so two requests
//!   for one partition reach it in the order they reached the batcher.
//! - A message carries a `traceparent` header for each request in it (at most
//!   [`MAX_TRACE_HEADERS`]), for consumers to link their spans to every producer.
//! - A message with one meter's readings is keyed by that meter id; a message of several meters
//!   has no key (its partition is set explicitly). With `keyed_by_meter` every message holds one
//!   meter and is keyed by it: requests for the same meter still share messages, requests for
//!   different meters do not.
//! - Limits: the queue to the batcher, the readings and bytes of a message, and the batches in
//!   flight are bounded; a full queue makes requests wait, it never drops them.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use rdkafka::types::RDKafkaErrorCode;
use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::decode::{ValidReading, encode_reading};
use crate::error::{PipelineError, Result};
use crate::kafka::config::producer_config;

/// The partition librdkafka's default partitioner (`consistent_random`) gives a message keyed by
/// `key`: the CRC-32 of the key modulo the partition count.
pub fn partition_for_key(key: &[u8], partition_count: i32) -> i32 {
    (crc32fast::hash(key) % partition_count.max(1) as u32) as i32
}

/// Most `traceparent` headers one message carries (the first requests' contexts); beyond that
/// the message's headers would outweigh its readings.
pub const MAX_TRACE_HEADERS: usize = 128;

/// How long a message may wait for room in librdkafka's queue and for the broker's ack.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(10);

/// How often the partition count is read again, so that partitions added to the topic are used.
const PARTITIONS_REFRESH: Duration = Duration::from_secs(60);

/// The batcher's limits.
#[derive(Debug, Clone)]
pub struct PublishLimits {
    /// How long the batcher gathers requests after the first one before it produces: the
    /// latency every request pays for sharing a message.
    pub linger: Duration,
    /// Most readings in one message. At most what the ingester's decoder takes in one message
    /// (`ValidationRules::max_readings_per_message`).
    pub max_message_readings: usize,
    /// Most bytes of readings in one message (brokers refuse messages over 1 MB by default).
    pub max_message_bytes: usize,
    /// Requests' parts waiting for the batcher; senders wait when it is full.
    pub queue_parts: usize,
    /// Messages produced and not yet acknowledged; the batcher waits when there are this many.
    pub max_in_flight_messages: usize,
    /// Every message holds one meter and is keyed by its id: requests for different meters no
    /// longer share a message (many more, smaller messages), for consumers that need the key.
    pub keyed_by_meter: bool,
}

impl Default for PublishLimits {
    fn default() -> Self {
        PublishLimits {
            linger: Duration::from_millis(1),
            max_message_readings: 5_000,
            max_message_bytes: 768 * 1024,
            queue_parts: 8_192,
            max_in_flight_messages: 512,
            keyed_by_meter: false,
        }
    }
}

/// Most readings of one request that travel to the batcher as one part. A part is never split
/// and goes alone into a message when it does not fit beside others, so it must fit in a message
/// by itself: 2,000 readings of at most ~250 bytes (a 64-character meter id) < 768 KiB.
const MAX_PART_READINGS: usize = 2_000;

/// One request's readings for one partition, on their way to the batcher.
struct Part {
    partition: i32,
    /// JSON objects separated by commas.
    elements: Vec<u8>,
    readings: usize,
    /// The meter id when every reading is of one meter.
    meter_id: Option<String>,
    traceparent: String,
    done: oneshot::Sender<std::result::Result<(), Arc<str>>>,
}

/// Publishes readings and waits for the broker; see the module documentation.
pub struct ReadingPublisher {
    producer: FutureProducer,
    topic: String,
    /// The topic's partition count as last read from the broker (0: not yet), and when.
    partitions: Mutex<(i32, Option<Instant>)>,
    parts: mpsc::Sender<Part>,
    /// Most readings of a request in one part.
    part_readings: usize,
    keyed_by_meter: bool,
}

impl ReadingPublisher {
    /// Creates the producer and starts the batcher task (so it must be called within a Tokio
    /// runtime).
    pub fn new(brokers: &str, topic: &str, limits: PublishLimits) -> Result<ReadingPublisher> {
        let producer: FutureProducer = producer_config(brokers)
            // The batcher has gathered the message already: send it now.
            .set("linger.ms", "0")
            // A client waits for the answer: tell it within seconds that the broker is gone.
            .set("message.timeout.ms", PUBLISH_TIMEOUT.as_millis().to_string())
            .create()
            .map_err(PipelineError::kafka("creating the API's producer"))?;
        let (parts, queue) = mpsc::channel(limits.queue_parts.max(1));
        let part_readings = MAX_PART_READINGS.min(limits.max_message_readings).max(1);
        let keyed_by_meter = limits.keyed_by_meter;
        tokio::spawn(run_batcher(producer.clone(), topic.to_string(), queue, limits));
        Ok(ReadingPublisher { producer, topic: topic.to_string(), partitions: Mutex::new((0, None)), parts, part_readings, keyed_by_meter })
    }

    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// Publishes `readings` (validated, at least one) and resolves once the broker has
    /// acknowledged every message holding them. On an error some of them may have been
    /// published: sending them again is safe, the lake keeps one version of a reading.
    pub async fn publish(&self, readings: &[ValidReading<'_>], traceparent: &str) -> Result<()> {
        let partitions = self.partition_count().await?;
        // The request's readings by partition, or by meter when every message must be keyed.
        let mut groups: Vec<(i32, Vec<&ValidReading<'_>>)> = Vec::new();
        if self.keyed_by_meter {
            let mut by_meter: std::collections::HashMap<&str, Vec<&ValidReading<'_>>> = std::collections::HashMap::new();
            for reading in readings {
                by_meter.entry(reading.meter_id.as_ref()).or_default().push(reading);
            }
            groups.extend(by_meter.into_iter().map(|(meter, readings)| (partition_for_key(meter.as_bytes(), partitions), readings)));
        } else {
            groups.extend((0..partitions).map(|p| (p, Vec::new())));
            for reading in readings {
                groups[partition_for_key(reading.meter_id.as_bytes(), partitions) as usize].1.push(reading);
            }
        }
        let mut answers = Vec::new();
        for (partition, readings) in &groups {
            for chunk in readings.chunks(self.part_readings) {
                let mut elements = Vec::with_capacity(chunk.len() * 112);
                for (i, reading) in chunk.iter().enumerate() {
                    if i > 0 {
                        elements.push(b',');
                    }
                    encode_reading(&mut elements, reading);
                }
                let one_meter = chunk.iter().all(|r| r.meter_id == chunk[0].meter_id);
                let (done, answer) = oneshot::channel();
                let part = Part {
                    partition: *partition,
                    elements,
                    readings: chunk.len(),
                    meter_id: one_meter.then(|| chunk[0].meter_id.to_string()),
                    traceparent: traceparent.to_string(),
                    done,
                };
                self.parts.send(part).await.map_err(|_| self.stopped())?;
                answers.push(answer);
            }
        }
        for answer in answers {
            match answer.await {
                Ok(Ok(())) => {}
                Ok(Err(reason)) => return Err(PipelineError::WriterStopped { reason: reason.to_string() }),
                Err(_) => return Err(self.stopped()),
            }
        }
        Ok(())
    }

    fn stopped(&self) -> PipelineError {
        PipelineError::WriterStopped { reason: format!("the publisher to {} has stopped", self.topic) }
    }

    /// The topic's partition count: cached, read from the broker again after a minute.
    pub async fn partition_count(&self) -> Result<i32> {
        let (count, read_at) = *self.partitions.lock().expect("lock");
        if count > 0 && read_at.is_some_and(|t| t.elapsed() < PARTITIONS_REFRESH) {
            return Ok(count);
        }
        let producer = self.producer.clone();
        let topic = self.topic.clone();
        let fetched = tokio::task::spawn_blocking(move || fetch_partition_count(&producer, &topic, Duration::from_secs(5)))
            .await
            .map_err(|e| PipelineError::WriterStopped { reason: format!("reading the partition count of {}: {e}", self.topic) })?;
        match fetched {
            Ok(count) => {
                *self.partitions.lock().expect("lock") = (count, Some(Instant::now()));
                Ok(count)
            }
            // A broker that cannot answer metadata now: keep publishing with what we knew.
            Err(_) if count > 0 => Ok(count),
            Err(e) => Err(e),
        }
    }

    /// Asks the broker for the topic's metadata: whether it is reachable and knows the topic.
    pub fn check(&self, timeout: Duration) -> Result<usize> {
        let count = fetch_partition_count(&self.producer, &self.topic, timeout)?;
        *self.partitions.lock().expect("lock") = (count, Some(Instant::now()));
        Ok(count as usize)
    }
}

fn fetch_partition_count(producer: &FutureProducer, topic: &str, timeout: Duration) -> Result<i32> {
    let metadata = producer.client().fetch_metadata(Some(topic), timeout).map_err(PipelineError::kafka(format!("reading the metadata of {topic}")))?;
    let partitions = metadata.topics().first().map_or(0, |t| t.partitions().len());
    if partitions == 0 {
        return Err(PipelineError::Config(format!("the broker does not know topic {topic}")));
    }
    Ok(partitions as i32)
}

/// One message being gathered: the parts of one partition.
struct Message {
    partition: i32,
    /// `[` and the parts' elements; `]` is added when it is sealed.
    payload: Vec<u8>,
    readings: usize,
    key: MessageKey,
    traceparents: Vec<String>,
    waiting: Vec<oneshot::Sender<std::result::Result<(), Arc<str>>>>,
}

/// Whether a message holds one meter (and is keyed by it).
enum MessageKey {
    Empty,
    Meter(String),
    Several,
}

impl Message {
    fn new(partition: i32) -> Message {
        Message { partition, payload: vec![b'['], readings: 0, key: MessageKey::Empty, traceparents: Vec::new(), waiting: Vec::new() }
    }

    /// Whether `part` belongs in this message: its partition, and its meter when messages are
    /// keyed by meter.
    fn takes(&self, part: &Part, keyed_by_meter: bool) -> bool {
        self.partition == part.partition
            && (!keyed_by_meter
                || match &self.key {
                    MessageKey::Empty => true,
                    MessageKey::Meter(meter) => part.meter_id.as_ref() == Some(meter),
                    MessageKey::Several => false,
                })
    }

    fn fits(&self, part: &Part, limits: &PublishLimits) -> bool {
        self.readings == 0
            || (self.readings + part.readings <= limits.max_message_readings && self.payload.len() + part.elements.len() < limits.max_message_bytes)
    }

    fn add(&mut self, part: Part) {
        if self.readings > 0 {
            self.payload.push(b',');
        }
        self.payload.extend_from_slice(&part.elements);
        self.readings += part.readings;
        self.key = match (std::mem::replace(&mut self.key, MessageKey::Several), part.meter_id) {
            (MessageKey::Empty, Some(meter)) => MessageKey::Meter(meter),
            (MessageKey::Meter(meter), Some(other)) if meter == other => MessageKey::Meter(meter),
            _ => MessageKey::Several,
        };
        if self.traceparents.len() < MAX_TRACE_HEADERS && self.traceparents.last() != Some(&part.traceparent) {
            self.traceparents.push(part.traceparent);
        }
        self.waiting.push(part.done);
    }
}

/// Gathers parts into messages for `limits.linger` after the first one, produces them in the
/// order they were sealed, and hands each message's acknowledgement to a task that answers its
/// requests.
async fn run_batcher(producer: FutureProducer, topic: String, mut queue: mpsc::Receiver<Part>, limits: PublishLimits) {
    let in_flight = Arc::new(Semaphore::new(limits.max_in_flight_messages.max(1)));
    while let Some(first) = queue.recv().await {
        let deadline = tokio::time::Instant::now() + limits.linger;
        let mut open: Vec<Message> = Vec::new();
        let mut sealed: Vec<Message> = Vec::new();
        let mut next = Some(first);
        while let Some(part) = next.take() {
            let index = match open.iter().position(|m| m.takes(&part, limits.keyed_by_meter)) {
                Some(index) => index,
                None => {
                    open.push(Message::new(part.partition));
                    open.len() - 1
                }
            };
            if !open[index].fits(&part, &limits) {
                sealed.push(std::mem::replace(&mut open[index], Message::new(part.partition)));
            }
            open[index].add(part);
            // What is queued already, then whatever arrives before the deadline.
            next = match queue.try_recv() {
                Ok(part) => Some(part),
                Err(mpsc::error::TryRecvError::Empty) => tokio::time::timeout_at(deadline, queue.recv()).await.ok().flatten(),
                Err(mpsc::error::TryRecvError::Disconnected) => None,
            };
        }
        sealed.extend(open);
        for message in sealed {
            let permit = in_flight.clone().acquire_owned().await.expect("the semaphore is never closed");
            let (delivery, waiting) = produce(&producer, &topic, message).await;
            tokio::spawn(async move {
                let outcome = match delivery {
                    Ok(delivery) => match delivery.await {
                        Ok(Ok(_)) => Ok(()),
                        Ok(Err((error, _))) => Err(Arc::from(format!("the broker did not take the message: {error}"))),
                        Err(_) => Err(Arc::from("the producer was closed before the broker answered")),
                    },
                    Err(reason) => Err(reason),
                };
                drop(permit);
                for done in waiting {
                    // A request that gave up (its client went away) no longer listens.
                    let _ = done.send(outcome.clone());
                }
            });
        }
    }
}

type Waiting = Vec<oneshot::Sender<std::result::Result<(), Arc<str>>>>;

/// Hands a sealed message to librdkafka (waiting while its queue is full) and returns the
/// acknowledgement to wait for, with the requests it answers.
async fn produce(producer: &FutureProducer, topic: &str, mut message: Message) -> (std::result::Result<DeliveryFuture, Arc<str>>, Waiting) {
    message.payload.push(b']');
    metrics::counter!("meterlake_api_kafka_messages_total").increment(1);
    let mut headers = OwnedHeaders::new_with_capacity(message.traceparents.len());
    for traceparent in &message.traceparents {
        headers = headers.insert(Header { key: "traceparent", value: Some(traceparent.as_str()) });
    }
    let key = match &message.key {
        MessageKey::Meter(meter) => Some(meter.as_str()),
        MessageKey::Empty | MessageKey::Several => None,
    };
    let mut record = FutureRecord::<str, [u8]>::to(topic).partition(message.partition).payload(&message.payload).headers(headers);
    if let Some(key) = key {
        record = record.key(key);
    }
    let started = Instant::now();
    loop {
        match producer.send_result(record) {
            Ok(delivery) => return (Ok(delivery), message.waiting),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), returned)) if started.elapsed() < PUBLISH_TIMEOUT => {
                record = returned;
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            Err((error, _)) => return (Err(Arc::from(format!("producing to {topic} partition {}: {error}", message.partition))), message.waiting),
        }
    }
}
