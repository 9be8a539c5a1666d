//! Helpers shared by the integration tests.
// Each test binary uses a subset of these.
#![allow(dead_code)]

pub mod population;
pub mod tables;
pub mod tls;
pub mod values;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

/// A `hedf serve` child process on an ephemeral loopback port; killed on drop.
pub struct Server {
    pub child: Child,
    /// `http://127.0.0.1:PORT`
    pub url: String,
}

impl Server {
    /// Starts `hedf serve` on `dir` with `extra` arguments (users, limits) and waits until it
    /// listens. Its log (warnings and errors only) goes to the test's stderr.
    pub fn start(dir: &Path, extra: &[&str]) -> Server {
        Server::spawn(dir, "127.0.0.1:0", extra, None)
    }

    /// Like [`Server::start`], its whole log (audit lines included) written to `log`.
    pub fn start_logged(dir: &Path, extra: &[&str], log: &Path) -> Server {
        Server::spawn(dir, "127.0.0.1:0", extra, Some(log))
    }

    /// Like [`Server::start`], listening on `listen` (say every address, `0.0.0.0:0`).
    pub fn start_on(dir: &Path, listen: &str, extra: &[&str]) -> Server {
        Server::spawn(dir, listen, extra, None)
    }

    fn spawn(dir: &Path, listen: &str, extra: &[&str], log: Option<&Path>) -> Server {
        let (level, stderr) = match log {
            Some(path) => ("info", Stdio::from(std::fs::File::create(path).unwrap())),
            None => ("warn", Stdio::inherit()),
        };
        let mut child = Command::new(env!("CARGO_BIN_EXE_hedf"))
            .args(["serve", "--listen", listen, "--data-dir"])
            .arg(dir)
            .args(extra)
            .env("HEDF_LOG", level)
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .split_whitespace()
            .nth(4)
            .unwrap_or_else(|| panic!("no address in {line:?}"))
            .trim_end_matches(',');
        Server {
            url: format!("http://{addr}"),
            child,
        }
    }

    /// The URL of a server started with `--tls-cert`: its certificate names `localhost`.
    pub fn https_url(&self) -> String {
        self.url.replace("http://127.0.0.1", "https://localhost")
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Asserts that `out` reproduces all 56 rows of numbers the seed's README printed for its three
/// aggregations, digit for digit.
pub fn assert_seed_rows_reproduced(out: &str) {
    let seed = include_str!("../fixtures/seed_readme.txt");
    let number = |s: &str| -> Vec<String> {
        s.split_whitespace()
            .filter(|w| w.contains('.') && w.parse::<f64>().is_ok())
            .map(String::from)
            .collect()
    };
    let start = seed.find("aggregate by area and decrypt:").unwrap();
    let end = seed.find("aggregate with invalid param:").unwrap();
    let want: Vec<Vec<String>> = seed[start..end]
        .lines()
        .map(number)
        .filter(|v| v.len() == 5)
        .collect();
    assert_eq!(want.len(), 56);
    let lines: Vec<Vec<String>> = out.lines().map(number).collect();
    for row in &want {
        assert!(
            lines
                .iter()
                .any(|l| l.windows(5).any(|w| w == row.as_slice())),
            "seed row {row:?} missing from:\n{out}"
        );
    }
}

/// The Python interpreter of the tests' own virtual environment (under cargo's target
/// folder), created on first use with the pinned packages of `tests/python/requirements.txt`,
/// so `cargo test` needs nothing installed by hand. Test binaries may run at once: a lock
/// folder makes one of them build the environment while the others wait.
pub fn python() -> std::path::PathBuf {
    static PYTHON: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    PYTHON.get_or_init(make_python_env).clone()
}

fn make_python_env() -> std::path::PathBuf {
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let requirements = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/requirements.txt");
    let pinned = std::fs::read_to_string(&requirements).unwrap();
    let venv = tmp.join("hedf-pyenv");
    let python = venv.join("bin/python");
    let stamp = venv.join("installed-requirements.txt");
    let _lock = LockDir::acquire(&tmp.join("hedf-pyenv.lock"));
    if std::fs::read_to_string(&stamp).is_ok_and(|s| s == pinned) {
        return python;
    }
    let run = |cmd: &mut Command| {
        let status = cmd.status().unwrap();
        assert!(status.success(), "{cmd:?} failed");
    };
    let _ = std::fs::remove_dir_all(&venv);
    run(Command::new("python3").args(["-m", "venv"]).arg(&venv));
    run(Command::new(&python)
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "-r",
        ])
        .arg(&requirements));
    std::fs::write(&stamp, &pinned).unwrap();
    python
}

/// A folder used as a lock between processes; removed when dropped, also on a panic.
struct LockDir(std::path::PathBuf);

impl LockDir {
    fn acquire(path: &Path) -> LockDir {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(900);
        while std::fs::create_dir(path).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "{} held for 15 minutes",
                path.display()
            );
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
        LockDir(path.to_path_buf())
    }
}

impl Drop for LockDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.0);
    }
}
