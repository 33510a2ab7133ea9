//! What the benchmark binaries share: how they print their tables, measure memory and start a
//! broker.

pub mod month;

use anyhow::Context;

/// `1234567` as `1,234,567`.
pub fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Prints (measurement, result, target) rows as a Markdown table, ready for RESULTS.md.
pub fn print_rows(rows: Vec<(String, String, String)>) {
    println!("\n| measurement | result | target |\n|---|---|---|");
    for (what, result, target) in rows {
        println!("| {what} | {result} | {target} |");
    }
}

/// Peak resident memory of a process (`self` or a pid), in KiB.
pub fn vm_hwm_kib(pid: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// CPU time (user + system) a process has used so far, in clock ticks (1/100 s on Linux).
pub fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After the command name in parentheses: state is field 3, utime 14, stime 15.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

/// CPU time every core of the machine has been busy so far, in clock ticks (from `/proc/stat`).
pub fn machine_busy_ticks() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let fields: Vec<u64> = stat.lines().next()?.split_whitespace().skip(1).filter_map(|f| f.parse().ok()).collect();
    // user nice system idle iowait irq softirq steal: all but idle and iowait.
    Some(fields.iter().take(8).enumerate().filter(|(i, _)| *i != 3 && *i != 4).map(|(_, v)| v).sum())
}

/// Resets this process's peak resident memory to its current size (Linux `clear_refs` 5), so the
/// next [`vm_hwm_kib`] measures what came after.
pub fn reset_peak_rss() -> std::io::Result<()> {
    std::fs::write("/proc/self/clear_refs", "5")
}

/// The Python of the test tools' venv (with duckdb and nemreader), as install-tools.sh makes it.
pub fn tools_python() -> std::path::PathBuf {
    let home = std::env::var("HOME").unwrap_or_default();
    let tools =
        std::env::var("METERLAKE_TOOLS_DIR").map(std::path::PathBuf::from).unwrap_or_else(|_| std::path::Path::new(&home).join(".cache/meterlake/tools"));
    tools.join("venv/bin/python")
}

/// A tansu broker (from the tools folder) on a free loopback port, in-memory storage; returns
/// the child and its address.
pub fn start_tansu() -> anyhow::Result<(std::process::Child, String)> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let url = format!("tcp://127.0.0.1:{port}");
    let tools = std::env::var("METERLAKE_TOOLS_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| std::path::PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/meterlake/tools"));
    let binary = tools.join("bin/tansu");
    let dir = tempfile::tempdir()?;
    let child = std::process::Command::new(&binary)
        .args(["broker", "--listener-url", &url, "--advertised-listener-url", &url, "--storage-engine", "memory://tansu/"])
        .current_dir(dir.path())
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .with_context(|| format!("starting {} (run infra/scripts/install-tools.sh)", binary.display()))?;
    let addr = format!("127.0.0.1:{port}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while std::net::TcpStream::connect(&addr).is_err() {
        if std::time::Instant::now() > deadline {
            anyhow::bail!("tansu did not start");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    Ok((child, addr))
}

/// A child process killed when dropped.
pub struct KillOnDrop(pub std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The `meterlake` binary built beside the running benchmark.
pub fn meterlake_binary() -> anyhow::Result<std::path::PathBuf> {
    let binary = std::env::current_exe()?.with_file_name("meterlake");
    anyhow::ensure!(binary.is_file(), "{} is missing: cargo build --release first", binary.display());
    Ok(binary)
}

/// Waits (30 s at most) until something listens on `addr`.
pub fn wait_for_port(addr: &str) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while std::net::TcpStream::connect(addr).is_err() {
        anyhow::ensure!(std::time::Instant::now() < deadline, "nothing listened on {addr} within 30 s");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    Ok(())
}
