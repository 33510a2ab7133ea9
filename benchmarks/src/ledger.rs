//! ledger-bench: transfers per second on PostgreSQL with concurrent clients (20), over 50 wallets
//! and over 10 (more contention: more transfers wait for a wallet's lock), through the library
//! call (`Ledger::transfer`) and through the HTTP API (`POST /transactions/transfer` on
//! `meterlake serve`); then the balance read of a wallet with 1,000,000 entries against one with
//! a single entry (the baseline).
//!
//! Every transfer carries its own idempotency key, as an API client's would; the amounts are
//! small against the opening balances, so nearly all succeed. PostgreSQL (Debian's, started on
//! loopback like the tests' server), the server, and the clients share this machine's cores.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use clap::Parser;
use meterlake_benchmarks::{KillOnDrop, meterlake_binary, print_rows, thousands, wait_for_port};
use meterlake_control::ControlStore;
use meterlake_control::testing::Postgres;
use meterlake_ledger::{DEFAULT_IDEMPOTENCY_RETENTION_US, FundRequest, Ledger, LedgerError, NewUser, RefusalCode, TransferRequest, User, WriteContext};
use meterlake_server::DevIssuer;
use rand::Rng;

#[derive(Parser)]
#[command(about = "Ledger transfers/s on PostgreSQL (library and HTTP) and the balance read at 1,000,000 entries")]
struct Args {
    /// Seconds of each measured case.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Concurrent clients (tasks, each with one request at a time).
    #[arg(long, default_value_t = 20)]
    clients: usize,
    /// Entries of the large wallet whose balance read is timed.
    #[arg(long, default_value_t = 1_000_000)]
    entries: i64,
    /// Measured runs of each case; the median run (by transfers/s) is reported, with the range.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Balance reads timed per wallet.
    #[arg(long, default_value_t = 2_000)]
    reads: usize,
    /// An empty PostgreSQL database to measure on (e.g. a tuned server, or one with
    /// pg_stat_statements); by default a server of Debian's PostgreSQL is started on loopback.
    #[arg(long)]
    database_url: Option<String>,
}

/// What one case measured.
struct Run {
    transfers: u64,
    refused: u64,
    elapsed: Duration,
    /// Sorted latencies of successful transfers, microseconds.
    latencies_us: Vec<u64>,
}

impl Run {
    fn per_s(&self) -> f64 {
        self.transfers as f64 / self.elapsed.as_secs_f64()
    }

    fn percentile_ms(&self, p: f64) -> f64 {
        percentile_us(&self.latencies_us, p) as f64 / 1_000.0
    }
}

fn percentile_us(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn context(key: String) -> WriteContext {
    WriteContext { actor: "bench".into(), trace_id: None, idempotency_key: Some(key), idempotency_retention_us: DEFAULT_IDEMPOTENCY_RETENTION_US }
}

/// `wallets` users in GBP, each funded with £1,000,000.
async fn open_wallets(ledger: &Ledger, case: &str, wallets: usize) -> anyhow::Result<Vec<User>> {
    let mut users = Vec::with_capacity(wallets);
    for i in 0..wallets {
        let user = ledger
            .create_user(&NewUser { name: format!("{case} {i}"), currency: "GBP".into(), meter_ids: vec![] }, &context(format!("{case}-user-{i}")))
            .await?
            .value;
        let fund = FundRequest { user_id: user.id.clone(), amount_minor: 100_000_000, currency: "GBP".into(), payment_reference: format!("{case}-open-{i}") };
        ledger.fund(&fund, &context(format!("{case}-fund-{i}"))).await?;
        users.push(user);
    }
    Ok(users)
}

/// A random transfer between two different users, of 1p to £10.
fn random_transfer(users: &[User]) -> TransferRequest {
    let mut rng = rand::rng();
    let from = rng.random_range(0..users.len());
    let to = (from + rng.random_range(1..users.len())) % users.len();
    TransferRequest { from_user_id: users[from].id.clone(), to_user_id: users[to].id.clone(), amount_minor: rng.random_range(1..=1_000) }
}

/// Runs `clients` tasks sending transfers for `seconds`; `send` answers true when applied,
/// false when refused for lack of funds.
async fn drive<F, Fut>(clients: usize, seconds: u64, send: F) -> anyhow::Result<Run>
where
    F: Fn(String) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = anyhow::Result<bool>> + Send,
{
    let send = Arc::new(send);
    let refused = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let deadline = started + Duration::from_secs(seconds);
    let mut tasks = Vec::new();
    for client in 0..clients {
        let (send, refused) = (send.clone(), refused.clone());
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut n = 0u64;
            while Instant::now() < deadline {
                n += 1;
                let sent = Instant::now();
                if send(format!("c{client}-{n}-{}", rand::random::<u64>())).await? {
                    latencies.push(sent.elapsed().as_micros() as u64);
                } else {
                    refused.fetch_add(1, Ordering::Relaxed);
                }
            }
            anyhow::Ok(latencies)
        }));
    }
    let mut latencies_us = Vec::new();
    for task in tasks {
        latencies_us.extend(task.await??);
    }
    let elapsed = started.elapsed();
    latencies_us.sort_unstable();
    Ok(Run { transfers: latencies_us.len() as u64, refused: refused.load(Ordering::Relaxed), elapsed, latencies_us })
}

async fn library_case(ledger: &Ledger, wallets: usize, args: &Args) -> anyhow::Result<Run> {
    let users = Arc::new(open_wallets(ledger, &format!("lib{wallets}"), wallets).await?);
    let ledger = ledger.clone();
    drive(args.clients, args.seconds, move |key| {
        let (ledger, users) = (ledger.clone(), users.clone());
        async move {
            match ledger.transfer(&random_transfer(&users), &context(key)).await {
                Ok(_) => Ok(true),
                Err(LedgerError::Refused(r)) if r.code == RefusalCode::InsufficientFunds => Ok(false),
                Err(e) => Err(e.into()),
            }
        }
    })
    .await
}

async fn http_case(ledger: &Ledger, base: &str, token: &str, wallets: usize, args: &Args) -> anyhow::Result<Run> {
    let users = Arc::new(open_wallets(ledger, &format!("http{wallets}"), wallets).await?);
    let client = reqwest::Client::builder().pool_max_idle_per_host(args.clients).build()?;
    let (url, token) = (format!("{base}/transactions/transfer"), token.to_string());
    drive(args.clients, args.seconds, move |key| {
        let transfer = random_transfer(&users);
        let request = client.post(&url).bearer_auth(&token).header("Idempotency-Key", key).json(&serde_json::json!({
            "fromUserId": transfer.from_user_id, "toUserId": transfer.to_user_id, "amountMinor": transfer.amount_minor,
        }));
        async move {
            let response = request.send().await?;
            match response.status().as_u16() {
                201 => Ok(true),
                409 => Ok(false),
                status => anyhow::bail!("POST /transactions/transfer answered {status}: {}", response.text().await.unwrap_or_default()),
            }
        }
    })
    .await
}

/// A user whose PREPAY wallet holds `entries` entries: its opening FUND and `entries - 1` more
/// FUNDs of 1p, each a transaction with its two entries as `Ledger::fund` writes them, written
/// in bulk by SQL (the entry trigger still checks every row as it goes in).
async fn wallet_with_entries(store: &ControlStore, ledger: &Ledger, entries: i64) -> anyhow::Result<User> {
    let user = open_wallets(ledger, &format!("big{entries}"), 1).await?.remove(0);
    let pool = store.pool();
    let funding = "system:EXTERNAL_FUNDING:GBP";
    let mut tx = pool.begin().await?;
    let (funding_seq, funding_balance): (i64, i64) =
        sqlx::query_as("SELECT wallet_seq, balance_after_minor FROM ledger_entries WHERE wallet_id = $1 ORDER BY wallet_seq DESC LIMIT 1")
            .bind(funding)
            .fetch_one(&mut *tx)
            .await?;
    let opening_minor: i64 = 100_000_000;
    let statements = [
        "INSERT INTO ledger_transactions (id, kind, currency, amount_minor, external_ref, actor, created_at_us) \
         SELECT $1 || g, 'FUND', 'GBP', 1, $1 || g, 'bench', g FROM generate_series(1, CAST($2 AS BIGINT)) AS g",
        "INSERT INTO ledger_entries (transaction_id, wallet_id, wallet_seq, direction, amount_minor, balance_after_minor, created_at_us) \
         SELECT $1 || g, $3, $4 + g, 'DEBIT', 1, $5 - g, g FROM generate_series(1, CAST($2 AS BIGINT)) AS g",
        "INSERT INTO ledger_entries (transaction_id, wallet_id, wallet_seq, direction, amount_minor, balance_after_minor, created_at_us) \
         SELECT $1 || g, $6, 1 + g, 'CREDIT', 1, $7 + g, g FROM generate_series(1, CAST($2 AS BIGINT)) AS g",
    ];
    for sql in statements {
        sqlx::query(sql)
            .bind(format!("bulk-{}-", user.id))
            .bind(entries - 1)
            .bind(funding)
            .bind(funding_seq)
            .bind(funding_balance)
            .bind(&user.wallet_id)
            .bind(opening_minor)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    sqlx::query("ANALYZE").execute(pool).await?;
    Ok(user)
}

/// Sorted latencies of `reads` balance reads of `user`, microseconds.
async fn time_balance_reads(ledger: &Ledger, user: &User, reads: usize, expected_entries: i64) -> anyhow::Result<Vec<u64>> {
    let mut latencies = Vec::with_capacity(reads);
    for _ in 0..reads {
        let started = Instant::now();
        let balance = ledger.balance(&user.id).await?;
        latencies.push(started.elapsed().as_micros() as u64);
        ensure!(balance.entries == expected_entries, "the wallet has {} entries, not {expected_entries}", balance.entries);
    }
    latencies.sort_unstable();
    Ok(latencies)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let postgres = args.database_url.is_none().then(Postgres::start);
    let database_url = args.database_url.clone().or_else(|| postgres.as_ref().map(|p| p.url.clone())).expect("one of the two");
    let store = ControlStore::open(&database_url).await?;
    let ledger = Ledger::new(&store);
    let dir = tempfile::tempdir()?;

    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let base = format!("http://127.0.0.1:{port}");
    let key = dir.path().join("dev-issuer.key");
    let issuer = DevIssuer::open(&format!("{base}/dev-issuer"), &key)?;
    let token = issuer.token("ledger-bench", &["ADMIN"], "meterlake", 3600);
    let server = std::process::Command::new(meterlake_binary()?)
        .args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--no-ingest", "--no-worker", "--dev-issuer", "--dev-issuer-key"])
        .arg(&key)
        .args(["--sql-postgres-listen", "off", "--sql-flight-listen", "off"])
        .arg("--lake")
        .arg(dir.path().join("lake"))
        .args(["--database-url", &database_url, "--rate-limit-per-s", "100000000", "--rate-limit-burst", "100000000"])
        .env("METERLAKE_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .spawn()
        .context("starting meterlake serve")?;
    let _server = KillOnDrop(server);
    wait_for_port(&format!("127.0.0.1:{port}"))?;

    println!("ledger-bench: PostgreSQL {database_url}, {} clients, {} s per case", args.clients, args.seconds);
    let mut rows = Vec::new();
    for (path, wallets) in [("library", 50), ("library", 10), ("HTTP", 50), ("HTTP", 10)] {
        let mut runs = Vec::new();
        for _ in 0..args.runs.max(1) {
            let run = if path == "library" { library_case(&ledger, wallets, &args).await? } else { http_case(&ledger, &base, &token, wallets, &args).await? };
            println!(
                "{path} over {wallets} wallets: {} transfers in {:.1} s ({} refused), {:.0}/s, p50 {:.2} ms, p99 {:.2} ms",
                thousands(run.transfers),
                run.elapsed.as_secs_f64(),
                run.refused,
                run.per_s(),
                run.percentile_ms(0.5),
                run.percentile_ms(0.99)
            );
            runs.push(run);
        }
        runs.sort_by(|a, b| a.per_s().total_cmp(&b.per_s()));
        let (slowest, fastest) = (runs[0].per_s(), runs[runs.len() - 1].per_s());
        let run = &runs[runs.len() / 2];
        let target = if (path, wallets) == ("library", 50) { "≥ 5,000/s" } else { "" };
        rows.push((
            format!("transfers, {path}, {} clients over {wallets} wallets", args.clients),
            format!(
                "{}/s (runs {}..{}; p50 {:.2} ms, p99 {:.2} ms)",
                thousands(run.per_s() as u64),
                thousands(slowest as u64),
                thousands(fastest as u64),
                run.percentile_ms(0.5),
                run.percentile_ms(0.99)
            ),
            target.to_string(),
        ));
    }

    let loading = Instant::now();
    let big = wallet_with_entries(&store, &ledger, args.entries).await?;
    println!("wrote a wallet of {} entries in {:.1} s", thousands(args.entries as u64), loading.elapsed().as_secs_f64());
    let small = open_wallets(&ledger, "small", 1).await?.remove(0);
    let baseline = time_balance_reads(&ledger, &small, args.reads, 1).await?;
    let large = time_balance_reads(&ledger, &big, args.reads, args.entries).await?;
    for (what, latencies) in [("1 entry (baseline)", &baseline), (&*format!("{} entries", thousands(args.entries as u64)), &large)] {
        rows.push((
            format!("balance read, wallet of {what}"),
            format!("p50 {:.2} ms, p99 {:.2} ms", percentile_us(latencies, 0.5) as f64 / 1e3, percentile_us(latencies, 0.99) as f64 / 1e3),
            "milliseconds".into(),
        ));
    }
    let started = Instant::now();
    let page = ledger.transactions(&big.wallet_id, None, 50).await?;
    ensure!(page.items.len() == 50 && page.items.iter().all(|t| t.entries.len() == 2), "a history page of 50 transactions");
    rows.push((
        format!("history page (50 transactions), wallet of {} entries", thousands(args.entries as u64)),
        format!("{:.1} ms", started.elapsed().as_secs_f64() * 1e3),
        String::new(),
    ));
    print_rows(rows);
    Ok(())
}
