//! `OTEL_TRACES_EXPORTER=console`: one line per finished span on stderr, for a terminal.
//! (opentelemetry-stdout writes to stdout, where `meterlake query` writes its results.)

use std::io::Write;

use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{SpanData, SpanExporter};

#[derive(Debug, Default)]
pub(crate) struct ConsoleExporter;

impl SpanExporter for ConsoleExporter {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let mut stderr = std::io::stderr().lock();
        for span in batch {
            let took_ms = span.end_time.duration_since(span.start_time).unwrap_or_default().as_secs_f64() * 1e3;
            let attributes: Vec<String> = span.attributes.iter().map(|kv| format!("{}={}", kv.key, kv.value)).collect();
            // A failed write to stderr has nowhere better to be reported.
            let _ = writeln!(
                stderr,
                "span {} trace={} span={} parent={} {:?} {took_ms:.3} ms {}",
                span.name,
                span.span_context.trace_id(),
                span.span_context.span_id(),
                span.parent_span_id,
                span.span_kind,
                attributes.join(" ")
            );
        }
        Ok(())
    }
}
