//! A throwaway PostgreSQL cluster for the tests.
//!
//! One cluster per test binary, made on first use with the `initdb` and `postgres` of the
//! newest PostgreSQL under `/usr/lib/postgresql/*/bin`, listening on a free loopback port;
//! each test gets a fresh database in it, so tests run in parallel. PostgreSQL refuses to run
//! as root, so as root (CI) both run as the `postgres` OS user, in a temporary directory that
//! user owns.
//!
//! The postmaster is started by a small shell "reaper" whose standard input is a pipe from this
//! process. The pipe closes when the test binary exits, however it exits (even SIGKILL, even
//! during `initdb`); the reaper then stops the postmaster and removes the
//! directory, so no PostgreSQL outlives the tests.
//!
//! Without PostgreSQL the tests print one "skipped: no PostgreSQL" line and pass, unless
//! `MAILPLATFORM_REQUIRE_POSTGRES=1` (CI sets it), which makes that a failure.

use std::io::Write as _;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::str::FromStr as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::OnceCell;
use tokio::time::Instant;

use crate::config::PostgresUrl;

/// The environment variable that turns "no PostgreSQL here" into a failure.
const REQUIRE: &str = "MAILPLATFORM_REQUIRE_POSTGRES";
/// How long the postmaster may take to accept connections.
const START_DEADLINE: Duration = Duration::from_secs(60);

/// Owns the cluster's directory from the start: starts the postmaster when the test process
/// writes a line (after `initdb`), then waits for the test process to exit (its end of the
/// pipe on stdin closes), stops the postmaster and removes the directory. `$1` is the
/// directory, the rest the postmaster's command. Ctrl-C reaches the whole process group: the
/// postmaster stops by itself, and the reaper ignores it so that it still cleans up.
///
/// The stop is SIGTERM (smart shutdown: the test process, its only client, is gone), not
/// SIGINT: a command started in the background of a script ignores SIGINT until it installs
/// its own handler, so a SIGINT sent while the postmaster is still starting would be lost.
const REAPER: &str = r#"
dir=$1; shift
trap '' INT HUP
if ! read -r _; then
    rm -rf "$dir"
    exit 0
fi
"$@" </dev/null >"$dir/postgres.log" 2>&1 &
pg=$!
read -r _
kill -TERM "$pg" 2>/dev/null
wait "$pg"
rm -rf "$dir"
"#;

/// The running cluster; never dropped (it lives in a static).
struct Cluster {
    port: u16,
    /// The reaper, held so that its stdin pipe stays open until the process exits.
    _reaper: Mutex<Child>,
}

/// Why there is no cluster.
enum Unavailable {
    /// PostgreSQL is not installed (or cannot run here): skip, unless required.
    Missing(String),
    /// PostgreSQL is installed but the cluster failed: always a failure.
    Broken(String),
}

static CLUSTER: OnceCell<Result<Cluster, String>> = OnceCell::const_new();

/// A URL of a fresh, empty database, or `None` when PostgreSQL is missing and not required
/// (after saying so once). Panics when it is required but missing, or when it is installed but
/// the cluster cannot be started.
pub(crate) async fn fresh_database() -> Option<PostgresUrl> {
    Some(cluster().await?.create_database().await)
}

/// A URL of database `database` on `port` of the loopback interface.
pub(crate) fn url(port: u16, database: &str) -> PostgresUrl {
    PostgresUrl::from_str(&format!(
        "postgres://postgres:unused-password@127.0.0.1:{port}/{database}"
    ))
    .expect("a valid URL")
}

async fn cluster() -> Option<&'static Cluster> {
    let cluster = CLUSTER
        .get_or_init(|| async {
            match start().await {
                Ok(c) => Ok(c),
                Err(Unavailable::Missing(why)) => Err(why),
                Err(Unavailable::Broken(why)) => panic!("cannot start a test PostgreSQL: {why}"),
            }
        })
        .await;
    match cluster {
        Ok(c) => Some(c),
        Err(why) => {
            if std::env::var(REQUIRE).is_ok_and(|v| v == "1") {
                panic!("{REQUIRE}=1, but there is no PostgreSQL to test with: {why}");
            }
            say_skipped(why);
            None
        }
    }
}

/// Once per binary, straight to stderr: libtest would capture `eprintln!`.
fn say_skipped(why: &str) {
    static SAID: std::sync::Once = std::sync::Once::new();
    SAID.call_once(|| {
        let _ = writeln!(
            std::io::stderr(),
            "skipped: no PostgreSQL ({why}); the PostgreSQL location tests pass without \
             running (set {REQUIRE}=1 to make this a failure)"
        );
    });
}

impl Cluster {
    async fn create_database(&self) -> PostgresUrl {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "t{}_{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let (client, conn) = tokio_postgres::connect(
            &format!(
                "host=127.0.0.1 port={} user=postgres dbname=postgres",
                self.port
            ),
            tokio_postgres::NoTls,
        )
        .await
        .expect("connecting to the test cluster");
        let conn = tokio::spawn(conn);
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .expect("creating a test database");
        drop(client);
        let _ = conn.await;
        url(self.port, &name)
    }
}

async fn start() -> Result<Cluster, Unavailable> {
    let bin = find_binaries().map_err(Unavailable::Missing)?;
    let as_postgres = is_root().map_err(Unavailable::Broken)?;
    let owner = if as_postgres {
        Some(postgres_user().map_err(Unavailable::Missing)?)
    } else {
        None
    };
    let broken = Unavailable::Broken;
    let dir = tempfile::Builder::new()
        .prefix("mailplatform-pg-")
        .tempdir()
        .map_err(|e| broken(format!("cannot make a temporary directory: {e}")))?
        .keep();
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::chown(&dir, Some(uid), Some(gid))
            .map_err(|e| broken(format!("cannot give {} to postgres: {e}", dir.display())))?;
    }
    let data = dir.join("data");
    let port = free_port().map_err(|e| broken(format!("no free port: {e}")))?;
    let postgres = as_user(as_postgres, &bin.join("postgres"));
    let mut reaper = Command::new("sh")
        .args(["-c", REAPER, "sh"])
        .arg(&dir)
        .arg(postgres.get_program())
        .args(postgres.get_args())
        .args(["-D".as_ref(), data.as_os_str()])
        .args(["-p", &port.to_string()])
        .args(["-c", "listen_addresses=127.0.0.1", "-k"])
        .arg(&dir)
        // Throwaway data: no fsync; enough connections for tests in parallel.
        .args(["-c", "fsync=off", "-c", "max_connections=200"])
        .current_dir(&dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| broken(format!("cannot run sh: {e}")))?;
    let out = as_user(as_postgres, &bin.join("initdb"))
        .args(["-D".as_ref(), data.as_os_str()])
        .args(["-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync"])
        .current_dir(&dir)
        .output()
        .map_err(|e| broken(format!("cannot run initdb: {e}")))?;
    if !out.status.success() {
        return Err(broken(format!(
            "initdb failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    if let Some(stdin) = reaper.stdin.as_mut() {
        stdin
            .write_all(b"start\n")
            .map_err(|e| broken(format!("cannot start the postmaster: {e}")))?;
    }
    let cluster = Cluster {
        port,
        _reaper: Mutex::new(reaper),
    };
    wait_until_ready(port, &dir).await.map_err(broken)?;
    Ok(cluster)
}

/// Polls until the postmaster accepts a connection, or says what it logged by the deadline.
async fn wait_until_ready(port: u16, dir: &Path) -> Result<(), String> {
    let deadline = Instant::now() + START_DEADLINE;
    let conninfo =
        format!("host=127.0.0.1 port={port} user=postgres dbname=postgres connect_timeout=2");
    loop {
        let last = match tokio_postgres::connect(&conninfo, tokio_postgres::NoTls).await {
            Ok(_) => return Ok(()),
            Err(e) => e,
        };
        if Instant::now() >= deadline {
            let log = std::fs::read_to_string(dir.join("postgres.log")).unwrap_or_default();
            return Err(format!(
                "not accepting connections on 127.0.0.1:{port} after {START_DEADLINE:?} \
                 ({last}); its log:\n{log}"
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The `bin` directory of the newest PostgreSQL installed from Debian packages.
fn find_binaries() -> Result<PathBuf, String> {
    let root = Path::new("/usr/lib/postgresql");
    let entries = std::fs::read_dir(root)
        .map_err(|e| format!("no {}: {e}", root.display()))?
        .filter_map(Result::ok);
    entries
        .filter_map(|e| {
            let version: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            (bin.join("initdb").is_file() && bin.join("postgres").is_file())
                .then_some((version, bin))
        })
        .max()
        .map(|(_, bin)| bin)
        .ok_or_else(|| format!("no initdb and postgres under {}/*/bin", root.display()))
}

fn is_root() -> Result<bool, String> {
    std::fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .map_err(|e| format!("cannot tell who runs the tests: {e}"))
}

/// The uid and gid of the `postgres` OS user (made by Debian's packages).
fn postgres_user() -> Result<(u32, u32), String> {
    let id = |flag: &str| -> Result<u32, String> {
        let out = Command::new("id")
            .args([flag, "postgres"])
            .output()
            .map_err(|e| format!("cannot run id: {e}"))?;
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .map_err(|_| {
                "running as root, and there is no postgres user to run PostgreSQL as".into()
            })
    };
    Ok((id("-u")?, id("-g")?))
}

/// `program`, run as the `postgres` user when the tests run as root.
fn as_user(as_postgres: bool, program: &Path) -> Command {
    if as_postgres {
        let mut c = Command::new("setpriv");
        c.args([
            "--reuid=postgres",
            "--regid=postgres",
            "--init-groups",
            "--",
        ])
        .arg(program);
        c
    } else {
        Command::new(program)
    }
}

fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}
