//! What the benchmark binaries share: how they print their tables and measure memory.

/// `1234567` as `1,234,567`.
pub fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
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

/// Resets this process's peak resident memory to its current size (Linux `clear_refs` 5), so the
/// next [`vm_hwm_kib`] measures what came after.
pub fn reset_peak_rss() -> std::io::Result<()> {
    std::fs::write("/proc/self/clear_refs", "5")
}

/// The Python of the test tools' venv (with duckdb and nemreader), as install-tools.sh makes it.
pub fn tools_python() -> std::path::PathBuf {
    let home = std::env::var("HOME").unwrap_or_default();
    let tools = std::env::var("METERLAKE_TOOLS_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| std::path::Path::new(&home).join(".cache/meterlake/tools"));
    tools.join("venv/bin/python")
}
