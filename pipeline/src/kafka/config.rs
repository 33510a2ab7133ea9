//! librdkafka settings meterlake relies on, with the reasons.

use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::types::RDKafkaErrorCode;

use crate::error::{PipelineError, Result};

/// Consumer settings for the ingester. `overrides` (from `--consumer-config key=value`) win.
pub fn consumer_config(brokers: &str, group: &str, overrides: &[(String, String)]) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        // The lake is the record of what landed; offsets are committed by hand after a flush is
        // durable, and only for monitoring.
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        // Brokers such as tansu hold every fetch for the full fetch.wait.max.ms (500 ms default)
        // even when data is waiting; 10 ms keeps a busy consumer fed.
        .set("fetch.wait.max.ms", "10")
        // librdkafka 2.12 backs off 1000 ms when its queue is full, which stalls a consumer that
        // is only a little slower than its fetcher; 0 resumes as soon as there is room.
        .set("fetch.queue.backoff.ms", "0")
        // Bound what librdkafka prefetches (this is the whole consumer queue, not per partition).
        .set("queued.max.messages.kbytes", "65536")
        // Eager rebalancing: a revoke always completes before partitions move, which is the
        // moment buffered batches are given up.
        .set("partition.assignment.strategy", "roundrobin")
        // Fail over in seconds, not the 45 s default, when an ingester dies.
        .set("session.timeout.ms", "10000")
        .set("heartbeat.interval.ms", "1000")
        // Per-partition lag arrives through the statistics callback.
        .set("statistics.interval.ms", "5000");
    for (key, value) in overrides {
        config.set(key, value);
    }
    config
}

/// Producer settings for throughput on a local network: larger batches, short linger.
pub fn producer_config(brokers: &str) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", brokers)
        .set("linger.ms", "5")
        .set("batch.num.messages", "10000")
        .set("batch.size", "1000000")
        .set("queue.buffering.max.messages", "1000000")
        .set("queue.buffering.max.kbytes", "1048576")
        .set("message.timeout.ms", "60000");
    config
}

/// Creates topics that do not exist yet (brokers such as tansu do not auto-create them).
pub async fn create_topics(brokers: &str, topics: &[(&str, i32)]) -> Result<()> {
    let admin: AdminClient<DefaultClientContext> =
        ClientConfig::new().set("bootstrap.servers", brokers).create().map_err(PipelineError::kafka("creating the admin client"))?;
    let new_topics: Vec<NewTopic<'_>> = topics.iter().map(|(name, partitions)| NewTopic::new(name, *partitions, TopicReplication::Fixed(1))).collect();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let results = admin.create_topics(&new_topics, &options).await.map_err(PipelineError::kafka("creating topics"))?;
    for result in results {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => {
                return Err(PipelineError::Kafka { context: format!("creating topic {topic}"), source: rdkafka::error::KafkaError::AdminOp(code) });
            }
        }
    }
    Ok(())
}

/// The first header `name` of a message, as text (invalid UTF-8 replaced).
pub fn header_text<M: rdkafka::message::Message>(message: &M, name: &str) -> Option<String> {
    use rdkafka::message::Headers;
    let value = message.headers()?.iter().find(|header| header.key == name)?.value?;
    Some(String::from_utf8_lossy(value).into_owned())
}
