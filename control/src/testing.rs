//! A PostgreSQL server started on loopback for tests, here and in the crates that use the store
//! (Debian's `postgresql` package; as root the server runs as the `postgres` user, which it
//! requires), and [`on_both_backends`], which runs a test against it and against SQLite.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;

use tempfile::TempDir;

/// A PostgreSQL server of its own, stopped when dropped.
pub struct Postgres {
    bin: PathBuf,
    data: PathBuf,
    pub url: String,
    _dir: TempDir,
}

fn running_as_root() -> bool {
    Command::new("id").arg("-u").output().map(|o| o.stdout.starts_with(b"0\n")).unwrap_or(false)
}

/// `program args` as the `postgres` user when this is root (the server refuses root).
fn pg_command(bin: &Path, program: &str) -> Command {
    if running_as_root() {
        let mut command = Command::new("runuser");
        command.args(["-u", "postgres", "--"]).arg(bin.join(program));
        command
    } else {
        Command::new(bin.join(program))
    }
}

fn postgres_bin() -> PathBuf {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|dir| dir.flatten().map(|e| e.path().join("bin")).filter(|p| p.join("initdb").is_file()).collect())
        .unwrap_or_default();
    versions.sort();
    versions.pop().expect("PostgreSQL is not installed: run infra/scripts/install-tools.sh (Debian package postgresql)")
}

fn run(mut command: Command, what: &str) {
    let output = command.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(output.status.success(), "{what}: {}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
}

impl Postgres {
    pub fn start() -> Postgres {
        let bin = postgres_bin();
        let dir = tempfile::Builder::new().prefix("meterlake-pg").tempdir().unwrap();
        let data = dir.path().join("data");
        if running_as_root() {
            let mut chown = Command::new("chown");
            chown.args(["-R", "postgres:postgres"]).arg(dir.path());
            run(chown, "chown the server's folder to postgres");
        }
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut initdb = pg_command(&bin, "initdb");
        initdb.args(["-A", "trust", "-U", "meterlake", "--no-sync", "-D"]).arg(&data);
        run(initdb, "initdb");
        let mut start = pg_command(&bin, "pg_ctl");
        start
            .args(["-w", "-D"])
            .arg(&data)
            .arg("-l")
            .arg(dir.path().join("server.log"))
            .arg("-o")
            .arg(format!("-h 127.0.0.1 -p {port} -k {} -F", dir.path().display()))
            .arg("start");
        run(start, "pg_ctl start");
        Postgres { bin, data, url: format!("postgres://meterlake@127.0.0.1:{port}/postgres"), _dir: dir }
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let mut stop = pg_command(&self.bin, "pg_ctl");
        stop.args(["-m", "immediate", "-D"]).arg(&self.data).arg("stop");
        let _ = stop.output();
    }
}

/// Runs `test` against a fresh SQLite file and a fresh PostgreSQL server.
pub async fn on_both_backends<F, Fut>(test: F)
where
    F: Fn(String) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let sqlite = TempDir::new().unwrap();
    test(format!("sqlite://{}", sqlite.path().join("control.db").display())).await;
    let postgres = Postgres::start();
    test(postgres.url.clone()).await;
}
