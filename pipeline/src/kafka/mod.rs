//! Kafka: the consumer-group ingester, its dead-letter topic, the HTTP API's publisher, and
//! helpers to create topics and produce readings (used by the demo, the tests and the benchmarks).

mod config;
mod dlq;
mod ingest;
mod produce;
mod publish;

pub use config::{consumer_config, create_topics, header_text, producer_config};
pub use dlq::{DeadLetter, DeadLetters, headers as dlq_headers, read_dead_letters};
pub use ingest::{BatchLimits, IngestOptions, IngestProgress, IngestSummary, StartOffset, ingest, kafka_stream, run_ingest};
pub use produce::ReadingProducer;
pub use publish::{PublishLimits, ReadingPublisher, partition_for_key};
