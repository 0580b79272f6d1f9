//! A real PostgreSQL for tests, started by the test process itself: `initdb` in a temporary
//! folder and `pg_ctl start` on a free loopback port (the socket in that folder too). Nothing is
//! started by hand.
//!
//! ```ignore
//! let url = support::postgres::database(); // postgres://postgres@127.0.0.1:PORT/test_…
//! let pool = sqlx::PgPool::connect(&url).await?;
//! ```
//!
//! [`database`] creates a fresh database on one server per test process ([`PgServer::shared`]),
//! which stops (`pg_ctl stop -m immediate`) and is removed when the process ends. A test that
//! needs a server of its own (to stop or restart it) uses [`PgServer::start`], stopped on drop.
//!
//! The binaries: `PG_BIN` if set, else `/usr/lib/postgresql/15/bin` (Debian's `postgresql`
//! package; `scripts/test.sh` installs it), else the newest `/usr/lib/postgresql/*/bin`.
//! PostgreSQL refuses to run as root: as root, the folder is given to the `postgres` user and
//! `initdb` / `pg_ctl` run through `runuser -u postgres --`; otherwise they run directly.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// A running PostgreSQL server owned by this process.
pub struct PgServer {
    pub port: u16,
    /// Data folder, socket and log (`server.log`).
    pub dir: PathBuf,
    /// Stops the server and removes `dir` when dropped, or when the process ends (a server in
    /// a `static` is never dropped).
    _watchdog: Watchdog,
}

/// A shell that runs its cleanup when its stdin reaches EOF: when this is dropped (the pipe
/// closes, then we wait for the cleanup), or when the process that holds the pipe ends.
struct Watchdog(Child);

impl Drop for Watchdog {
    fn drop(&mut self) {
        drop(self.0.stdin.take());
        let _ = self.0.wait();
    }
}

static SHARED: OnceLock<PgServer> = OnceLock::new();
static NEXT_DB: AtomicUsize = AtomicUsize::new(0);

/// A fresh, empty database on the process's shared server; its URL.
pub fn database() -> String {
    PgServer::shared().create_database()
}

/// Where `initdb`, `pg_ctl` and `createdb` are.
pub fn bin_dir() -> PathBuf {
    if let Ok(p) = std::env::var("PG_BIN") {
        return p.into();
    }
    let debian15 = PathBuf::from("/usr/lib/postgresql/15/bin");
    if debian15.join("initdb").exists() {
        return debian15;
    }
    let newest = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|v| Path::new(&format!("/usr/lib/postgresql/{v}/bin/initdb")).exists())
        .max();
    match newest {
        Some(v) => PathBuf::from(format!("/usr/lib/postgresql/{v}/bin")),
        None => panic!(
            "PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb): run ./scripts/test.sh \
             (it installs Debian's postgresql), or set PG_BIN"
        ),
    }
}

fn is_root() -> bool {
    std::fs::metadata("/proc/self").map(|m| m.uid() == 0).unwrap_or(false)
}

/// `program args…` as the user PostgreSQL runs as: `postgres` through runuser when we are
/// root, else ourselves.
fn as_pg_user(program: &Path) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

fn run(mut cmd: Command, what: &str) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl PgServer {
    /// The server shared by the tests of this process, started on first use.
    pub fn shared() -> &'static PgServer {
        SHARED.get_or_init(PgServer::start)
    }

    /// A new server: `initdb -A trust` in a fresh temporary folder, started on a free loopback
    /// port, durability off (test data only).
    pub fn start() -> PgServer {
        PgServer::start_with(false)
    }

    /// A new server with PostgreSQL's durable defaults (fsync, synchronous commit, full page
    /// writes): what the benchmark compares with SQLite's `synchronous = full`.
    #[allow(dead_code)]
    pub fn start_durable() -> PgServer {
        PgServer::start_with(true)
    }

    fn start_with(durable: bool) -> PgServer {
        let bin = bin_dir();
        let dir = std::env::temp_dir().join(format!(
            "syncrelay-pg-{}-{}",
            std::process::id(),
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir(&dir).expect("create the PostgreSQL folder");
        if is_root() {
            let mut chown = Command::new("chown");
            chown.arg("postgres:").arg(&dir);
            run(chown, "chown postgres");
        }
        // The watchdog first: whatever happens from here on (a failed initdb included), the
        // server and the folder go when we go.
        let stop = format!(
            "cat >/dev/null; {} {} -D \"$1\" stop -m immediate >/dev/null 2>&1; rm -rf \"$1\"",
            if is_root() { "runuser -u postgres --" } else { "" },
            bin.join("pg_ctl").display()
        );
        let watchdog = Watchdog(
            Command::new("sh")
                .arg("-c")
                .arg(stop)
                .arg("sh")
                .arg(&dir)
                .stdin(Stdio::piped())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start the PostgreSQL watchdog"),
        );
        let mut initdb = as_pg_user(&bin.join("initdb"));
        initdb
            .arg("-D")
            .arg(&dir)
            .args(["-A", "trust", "-U", "postgres", "-E", "UTF8", "--locale=C", "--no-sync"]);
        run(initdb, "initdb");
        let mut last = String::new();
        for _ in 0..5 {
            let port = super::free_port();
            let mut pg_ctl = as_pg_user(&bin.join("pg_ctl"));
            pg_ctl
                .arg("-D")
                .arg(&dir)
                .arg("-l")
                .arg(dir.join("server.log"))
                .arg("-o")
                .arg(format!(
                    "-p {port} -k {} -c listen_addresses=127.0.0.1 \
                     -c shared_preload_libraries=pg_stat_statements -c pg_stat_statements.track_utility=on {} {}",
                    dir.display(),
                    if durable {
                        ""
                    } else {
                        "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
                    },
                    // More server settings, for looking into a run (`-c auto_explain…`): tests
                    // and benchmarks leave it unset.
                    std::env::var("SYNCRELAY_TEST_PG_OPTIONS").unwrap_or_default()
                ))
                .args(["-w", "-t", "60", "start"])
                .stdin(Stdio::null());
            let out = pg_ctl.output().expect("pg_ctl");
            if out.status.success() {
                return PgServer {
                    port,
                    dir,
                    _watchdog: watchdog,
                };
            }
            // Most likely the port was taken between choosing and binding it: another try.
            last = format!(
                "{}{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                std::fs::read_to_string(dir.join("server.log")).unwrap_or_default()
            );
        }
        panic!("PostgreSQL did not start:\n{last}");
    }

    /// `postgres://postgres@127.0.0.1:PORT/db`.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// Create a fresh, empty database; its URL.
    pub fn create_database(&self) -> String {
        let name = format!(
            "test_{}_{}",
            std::process::id(),
            NEXT_DB.fetch_add(1, Ordering::Relaxed)
        );
        let mut createdb = Command::new(bin_dir().join("createdb"));
        createdb
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", "postgres"])
            .arg(&name)
            .env_remove("PGPASSWORD");
        let until = Instant::now() + Duration::from_secs(30);
        loop {
            let out = createdb.output().expect("createdb");
            if out.status.success() {
                return self.url(&name);
            }
            assert!(
                Instant::now() < until,
                "createdb {name}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Restart the server (`pg_ctl restart -m fast`: every connection is ended, as in a
    /// failover or an upgrade), on the same port and data; returns once it accepts connections.
    #[allow(dead_code)]
    pub fn restart(&self) {
        let mut pg_ctl = as_pg_user(&bin_dir().join("pg_ctl"));
        pg_ctl
            .arg("-D")
            .arg(&self.dir)
            .arg("-l")
            .arg(self.dir.join("server.log"))
            .args(["-m", "fast", "-w", "-t", "60", "restart"])
            .stdin(Stdio::null());
        run(pg_ctl, "pg_ctl restart");
    }

    /// The server's log so far.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }
}
