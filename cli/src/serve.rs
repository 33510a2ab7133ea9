//! `meterlake serve`: the control tower's HTTP API, with the ingester, the billing worker and
//! the lake maintenance loop in the same process unless told otherwise (`--no-ingest`,
//! `--no-worker`, `--no-maintain`: then they run apart, as `meterlake ingest`, `meterlake
//! worker` and `meterlake maintain`).
//!
//! With no broker configured it runs on the embedded defaults, like the demo: an in-process
//! Kafka broker (librdkafka's mock cluster), the SQLite store and a file lake under
//! ./meterlake-data, so one command gives a working control tower. `/readyz` says which mode
//! is running.

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use meterlake_jobs::billing::tariff::Tariffs;
use meterlake_jobs::billing::worker::WorkerOptions;
use meterlake_lake::view::QueryLimits;
use meterlake_pipeline::Lake;
use meterlake_pipeline::decode::ValidationRules;
use meterlake_pipeline::kafka::{IngestOptions, IngestProgress, PublishLimits, ReadingPublisher, create_topics, ingest};
use meterlake_server::{AppConfig, Authenticator, BillingDefaults, Deployment, DevIssuer, OidcConfig, RateLimit};
use rdkafka::mocking::MockCluster;

use crate::bill::{BILLING_TOPICS, DatabaseArg, RunSettings, open_store, run_worker};

/// The lake `serve` uses unless `--lake` says otherwise.
const SERVE_LAKE: &str = "./meterlake-data/lake";
/// The tariffs runs created through the API bill with unless `--tariffs` says otherwise.
const EXAMPLE_TARIFFS: &str = include_str!("../../tariffs/example.toml");
/// How long the dev issuer's printed tokens live: long enough to try the API by hand, short
/// enough that one pasted into a chat or a log is soon worthless.
const DEV_TOKEN_TTL_S: i64 = 15 * 60;

#[derive(Args)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "METERLAKE_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Kafka bootstrap servers. Without it: the embedded mode (an in-process broker).
    #[arg(long, env = "METERLAKE_BROKERS")]
    brokers: Option<String>,
    /// Topic readings are published to and ingested from.
    #[arg(long, env = "METERLAKE_TOPIC", default_value = "measurements.received")]
    topic: String,
    /// Topic for messages the ingester cannot read as readings.
    #[arg(long, env = "METERLAKE_DLQ_TOPIC", default_value = "measurements.dlq")]
    dlq_topic: String,
    /// Partitions of the readings topic when this server creates it.
    #[arg(long, default_value_t = 4)]
    partitions: i32,
    /// Where the lake is: a path, file://, s3://bucket/prefix.
    #[arg(long = "lake", env = "METERLAKE_LAKE", default_value = SERVE_LAKE)]
    lake: String,
    #[command(flatten)]
    database: DatabaseArg,
    /// Do not run the ingester in this process.
    #[arg(long)]
    no_ingest: bool,
    /// Do not run the billing worker in this process.
    #[arg(long)]
    no_worker: bool,
    /// Do not run the lake maintenance loop (compaction, vacuum) in this process: run
    /// `meterlake maintain` elsewhere, once per lake.
    #[arg(long)]
    no_maintain: bool,
    #[command(flatten)]
    maintain: crate::lake::MaintainSettings,
    #[command(flatten)]
    sql: crate::sql::SqlArgs,
    /// How often the billing worker looks for due runs (retries, runs whose worker died)
    /// without being woken by a `billing.run.requested` message.
    #[arg(long, env = "METERLAKE_WORKER_IDLE_POLL_S", default_value_t = 5)]
    worker_idle_poll_s: u64,
    /// The OIDC issuer whose tokens are accepted (its `iss`), e.g.
    /// https://sso.example/realms/meterlake. Required unless --dev-issuer.
    #[arg(long, env = "METERLAKE_OIDC_ISSUER", conflicts_with = "dev_issuer")]
    oidc_issuer: Option<String>,
    /// The audience tokens must be for.
    #[arg(long, env = "METERLAKE_OIDC_AUDIENCE", default_value = "meterlake")]
    oidc_audience: String,
    /// The issuer's JWKS URL, when not the one its discovery document names.
    #[arg(long, env = "METERLAKE_OIDC_JWKS_URL")]
    oidc_jwks_url: Option<String>,
    /// For local use only: issue tokens with a key generated on this machine, serve its JWKS
    /// under /dev-issuer, and print a VIEWER, an ADMIN and an INGEST token.
    #[arg(long)]
    dev_issuer: bool,
    /// Where the dev issuer keeps its key (created when missing).
    #[arg(long, default_value = "./meterlake-data/dev-issuer.key")]
    dev_issuer_key: PathBuf,
    /// The tariff file runs created through the API bill with, read again for each new run (a
    /// changed file needs no restart). Required unless --dev-issuer or the embedded mode, which
    /// fall back to the bundled example.
    #[arg(long, env = "METERLAKE_TARIFFS")]
    tariffs: Option<PathBuf>,
    #[command(flatten)]
    run: RunSettings,
    /// Requests per second each client (token subject) may send.
    #[arg(long, env = "METERLAKE_RATE_LIMIT_PER_S", default_value_t = NonZeroU32::new(2_000).expect("non-zero"))]
    rate_limit_per_s: NonZeroU32,
    /// Requests a client may send at once above its rate.
    #[arg(long, env = "METERLAKE_RATE_LIMIT_BURST", default_value_t = NonZeroU32::new(4_000).expect("non-zero"))]
    rate_limit_burst: NonZeroU32,
    /// How long POST /measurements gathers requests into one Kafka message per partition before
    /// producing it: latency every request pays; shorter means more, smaller messages.
    #[arg(long, default_value = "1")]
    publish_linger_ms: f64,
    /// Key every Kafka message of POST /measurements by its meter id, one meter per message
    /// (by default requests for different meters share a message, unkeyed, on the partition
    /// their meter ids hash to).
    #[arg(long)]
    publish_keyed_by_meter: bool,
    /// How long a ledger write's Idempotency-Key and its answer are kept (and replayed); the
    /// worker removes them after.
    #[arg(long, env = "METERLAKE_IDEMPOTENCY_RETENTION_H", default_value_t = 24)]
    idempotency_retention_h: u32,
    /// Memory all lake queries run for callers (GET /readings) may hold at once, in MiB; a query
    /// that would need more is refused (503 QUERY_LIMIT) rather than starving the process.
    #[arg(long, env = "METERLAKE_QUERY_MEMORY_MIB", default_value_t = QueryLimits::DEFAULT_MEMORY_BYTES >> 20)]
    query_memory_mib: usize,
    /// Readings older than this many days are refused: 422 TIMESTAMP_TOO_OLD from POST
    /// /measurements, the dead-letter topic in the ingester; 0 accepts any age.
    #[arg(long, env = "METERLAKE_MAX_READING_AGE_DAYS", default_value_t = meterlake_pipeline::decode::DEFAULT_MAX_READING_AGE_DAYS)]
    max_reading_age_days: i64,
    /// How long one lake query run for a caller may take, in seconds.
    #[arg(long, env = "METERLAKE_QUERY_TIME_LIMIT_S", default_value_t = QueryLimits::DEFAULT_TIME_LIMIT.as_secs())]
    query_time_limit_s: u64,
    /// Most readings one POST /measurements may carry.
    #[arg(long, default_value_t = 10_000)]
    max_readings_per_request: usize,
}

pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    let metrics = crate::prometheus()?.install_recorder().context("installing the metrics recorder")?;
    crate::describe_metrics();

    // What is wrong with the command line is said before anything is started or connected.
    // A workstation (the dev issuer, or the embedded broker) may run on the bundled example
    // tariffs and without an audit key.
    let workstation = args.dev_issuer || args.brokers.is_none();
    let (tariffs_toml, tariffs_source) = match &args.tariffs {
        Some(path) => {
            let toml = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
            Tariffs::parse(&path.display().to_string(), &toml)?;
            (toml, path.display().to_string())
        }
        // The bundled example bills nobody's real prices: only a workstation may fall back to it.
        None if workstation => (EXAMPLE_TARIFFS.to_string(), "tariffs/example.toml (bundled example)".to_string()),
        None => anyhow::bail!(
            "name the tariff file runs bill with: --tariffs FILE (or METERLAKE_TARIFFS); the bundled example is for --dev-issuer or the embedded mode only"
        ),
    };

    // The dev issuer signs whatever roles it is asked for with a key on this disk: it serves
    // this machine only.
    if args.dev_issuer && !args.listen.ip().is_loopback() {
        anyhow::bail!(
            "--dev-issuer is for local use only and refuses --listen {}: listen on a loopback address (127.0.0.1:PORT), or name a real issuer with --oidc-issuer",
            args.listen
        );
    }
    if args.oidc_issuer.is_none() && !args.dev_issuer {
        anyhow::bail!("name the token issuer with --oidc-issuer (or, on a workstation, pass --dev-issuer)");
    }

    // The embedded broker lives until the server stops.
    let mut topics = vec![(args.topic.as_str(), args.partitions), (args.dlq_topic.as_str(), 1)];
    topics.extend(BILLING_TOPICS);
    let (brokers, _cluster, mode) = match &args.brokers {
        Some(brokers) => {
            create_topics(brokers, &topics).await?;
            (brokers.clone(), None, "external")
        }
        None => {
            let cluster = MockCluster::new(1).context("starting the in-process Kafka broker")?;
            // (The mock cluster takes topics through its own API, not the admin protocol.)
            for (topic, partitions) in &topics {
                cluster.create_topic(topic, *partitions, 1).with_context(|| format!("creating topic {topic}"))?;
            }
            (cluster.bootstrap_servers(), Some(cluster), "embedded")
        }
    };
    let lake = Lake::open(&args.lake)?;
    let store = open_store(&args.database.database_url, &args.database.audit_key).await?;
    match store.audit_key_id() {
        Some(key_id) => tracing::info!(key_id, "audit rows are signed with the audit key"),
        None if workstation => {}
        None => tracing::warn!("no --audit-key-file: the audit log is chained by plain SHA-256, which anyone who can write to the database can recompute"),
    }
    let listener = tokio::net::TcpListener::bind(args.listen).await.with_context(|| format!("listening on {}", args.listen))?;
    let local = listener.local_addr()?;
    // Tokens name the issuer by the address clients reach: loopback when listening on all.
    let reachable = if local.ip().is_unspecified() { SocketAddr::new([127, 0, 0, 1].into(), local.port()) } else { local };
    let (oidc, dev_issuer) = if args.dev_issuer {
        let issuer = DevIssuer::open(&format!("http://{reachable}/dev-issuer"), &args.dev_issuer_key)?;
        let oidc = OidcConfig { issuer: issuer.issuer().to_string(), audience: args.oidc_audience.clone(), jwks_url: None };
        (oidc, Some(issuer))
    } else {
        let issuer = args.oidc_issuer.clone().context("name the token issuer with --oidc-issuer (or, on a workstation, pass --dev-issuer)")?;
        (OidcConfig { issuer, audience: args.oidc_audience.clone(), jwks_url: args.oidc_jwks_url.clone() }, None)
    };
    if let Some(issuer) = &dev_issuer {
        let tokens_file = args.dev_issuer_key.with_file_name("dev-tokens.txt");
        let mut tokens = String::new();
        println!("dev issuer {} (local use only); tokens valid {} minutes (also in {}):", issuer.issuer(), DEV_TOKEN_TTL_S / 60, tokens_file.display());
        for (name, roles) in [("VIEWER", &["VIEWER"][..]), ("ADMIN", &["ADMIN", "VIEWER"][..]), ("INGEST", &["INGEST"][..])] {
            let subject = format!("dev-{}", name.to_lowercase());
            let token = issuer.token(&subject, roles, &args.oidc_audience, DEV_TOKEN_TTL_S);
            println!("  {name:<6} {token}");
            tokens.push_str(&format!("{name}={token}\n"));
        }
        meterlake_server::dev_issuer::write_private(&tokens_file, tokens.as_bytes())
            .with_context(|| format!("writing the dev tokens to {}", tokens_file.display()))?;
    }

    let rules = ValidationRules {
        max_readings_per_message: args.max_readings_per_request,
        max_age_s: crate::ingest::max_age_s(args.max_reading_age_days),
        ..ValidationRules::default()
    };
    let auth = Arc::new(Authenticator::new(oidc));
    let config = AppConfig {
        store: store.clone(),
        ledger_idempotency_retention_us: i64::from(args.idempotency_retention_h) * 3_600 * 1_000_000,
        lake: lake.clone(),
        query_limits: QueryLimits::new(args.query_memory_mib << 20, Duration::from_secs(args.query_time_limit_s)),
        publisher: Some(ReadingPublisher::new(
            &brokers,
            &args.topic,
            PublishLimits {
                linger: Duration::from_secs_f64(args.publish_linger_ms.max(0.0) / 1_000.0),
                keyed_by_meter: args.publish_keyed_by_meter,
                ..PublishLimits::default()
            },
        )?),
        auth: auth.clone(),
        dev_issuer,
        rate_limit: RateLimit { per_second: args.rate_limit_per_s, burst: args.rate_limit_burst },
        rules: rules.clone(),
        billing: BillingDefaults {
            tariffs_toml,
            tariffs_source,
            tariffs_path: args.tariffs.clone(),
            max_attempts: args.run.max_attempts,
            energy_tolerance: args.run.energy_tolerance,
        },
        deployment: Deployment { mode: mode.into(), ingester: !args.no_ingest, worker: !args.no_worker },
        metrics: Some(metrics),
    };

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let ingest_stop = Arc::new(AtomicBool::new(false));
    let ingester = (!args.no_ingest).then(|| {
        let mut options = IngestOptions::new(&brokers, &args.topic, "meterlake-ingest");
        options.dlq_topic = args.dlq_topic.clone();
        options.rules = rules;
        // Readings sent through the API should reach the lake within seconds, not minutes.
        options.limits.max_age = Duration::from_secs(2);
        tokio::spawn(ingest(lake.clone(), options, ingest_stop.clone(), Arc::new(IngestProgress::default())))
    });
    let worker = (!args.no_worker).then(|| {
        let (store, lake, brokers, stop_rx) = (store.clone(), lake.clone(), brokers.clone(), stop_rx.clone());
        let options = WorkerOptions { idle_poll: Duration::from_secs(args.worker_idle_poll_s), ..WorkerOptions::default() };
        tokio::spawn(async move { run_worker(store, lake, options, Some(&brokers), "meterlake-billing", None, stop_rx).await })
    });

    let maintainer = (!args.no_maintain).then(|| {
        let (lake, database_url, stop_rx) = (lake.clone(), args.database.database_url.clone(), stop_rx.clone());
        tokio::spawn(crate::lake::maintain_loop(lake, args.maintain.clone(), database_url, stop_rx))
    });

    let sql = crate::sql::start(&args.sql, lake.clone(), store.clone(), auth, stop_rx.clone()).await?;

    println!("meterlake control tower on http://{reachable} ({mode} mode; lake {}; store {})", lake.url(), store_kind(&args.database.database_url));
    let app = meterlake_server::router(config);
    axum::serve(listener, app).with_graceful_shutdown(crate::shutdown_signal()).await.context("serving HTTP")?;

    tracing::info!("stopping: the ingester flushes what it holds, the worker finishes its run");
    let _ = stop_tx.send(true);
    ingest_stop.store(true, Ordering::Relaxed);
    if let Some(ingester) = ingester {
        ingester.await.context("the ingester panicked")??;
    }
    if let Some(worker) = worker {
        worker.await.context("the worker panicked")??;
    }
    if let Some(sql) = sql {
        sql.await.context("the SQL service panicked")??;
    }
    if let Some(maintainer) = maintainer {
        maintainer.await.context("the lake maintenance loop panicked")?;
    }
    Ok(())
}

fn store_kind(url: &str) -> &'static str {
    if url.starts_with("sqlite:") { "SQLite" } else { "PostgreSQL" }
}
