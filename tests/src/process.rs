//! The real `colony` binary as a child process.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use colony_daemon::node::NodeFile;

/// Path of the `colony` binary of this workspace, built (once per test run) if needed.
pub fn colony_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("workspace root")
            .to_owned();
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| root.join("target"));
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "--quiet", "-p", "colony-daemon", "--bin", "colony"])
            .current_dir(&root)
            .status()
            .expect("cannot run cargo to build the colony binary");
        assert!(status.success(), "building the colony binary failed");
        target.join("debug").join("colony")
    })
}

/// A `colony node` process and what it wrote to its data directory.
#[derive(Debug)]
pub struct NodeProcess {
    pub child: Child,
    pub data_dir: PathBuf,
    pub info: NodeFile,
    pub log: PathBuf,
}

impl NodeProcess {
    /// Starts `colony node --data-dir DIR ARGS…`, inside `netns` if given, and waits until it
    /// has written its `node.json`.
    pub fn start(data_dir: &Path, args: &[String], netns: Option<&str>) -> anyhow::Result<Self> {
        Self::start_command("node", data_dir, args, netns)
    }

    /// Starts `colony SUBCOMMAND --data-dir DIR ARGS…` (a subcommand that runs a node, such
    /// as `node` or `train`); its standard output goes to the log too.
    pub fn start_command(
        subcommand: &str,
        data_dir: &Path,
        args: &[String],
        netns: Option<&str>,
    ) -> anyhow::Result<Self> {
        std::fs::create_dir_all(data_dir)?;
        let info_path = data_dir.join("node.json");
        let _ = std::fs::remove_file(&info_path);
        let log = data_dir.join("node.log");
        let log_file = std::fs::File::create(&log)?;
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(colony_bin());
                c
            }
            None => Command::new(colony_bin()),
        };
        cmd.arg(subcommand)
            .arg("--data-dir")
            .arg(data_dir)
            .args(args);
        cmd.env(
            "COLONY_LOG",
            std::env::var("COLONY_TEST_LOG").unwrap_or_else(|_| "info".into()),
        );
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .spawn()
            .with_context(|| format!("cannot spawn colony {subcommand}"))?;
        let mut p = Self {
            child,
            data_dir: data_dir.to_owned(),
            info: placeholder(),
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(bytes) = std::fs::read(&info_path)
                && let Ok(info) = serde_json::from_slice::<NodeFile>(&bytes)
                && info.pid == p.child.id()
            {
                p.info = info;
                return Ok(p);
            }
            if let Some(status) = p.child.try_wait()? {
                bail!(
                    "colony node exited early with {status}; log:\n{}",
                    p.log_text()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "colony node did not start within 30 s; log:\n{}",
                    p.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The node's HTTP API base URL.
    /// The token the node's API asks of requests that change state.
    pub fn token(&self) -> String {
        std::fs::read_to_string(self.data_dir.join("api-token"))
            .map(|t| t.trim().to_string())
            .unwrap_or_default()
    }

    pub fn api(&self) -> String {
        format!(
            "http://{}",
            self.info.http.as_deref().unwrap_or("127.0.0.1:0")
        )
    }

    /// Dialable addresses with `/p2p/<id>`.
    pub fn dial_addrs(&self) -> Vec<String> {
        self.info
            .listen_addrs
            .iter()
            .map(|a| format!("{a}/p2p/{}", self.info.peer_id))
            .collect()
    }

    /// SIGKILL: no shutdown, no flush.
    pub fn kill9(&mut self) -> anyhow::Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }

    /// SIGTERM, then waits (up to 20 s) for the exit status.
    pub fn terminate(&mut self) -> anyhow::Result<ExitStatus> {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status()?;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(s) = self.child.try_wait()? {
                return Ok(s);
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                bail!(
                    "node did not exit within 20 s of SIGTERM; log:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn placeholder() -> NodeFile {
    NodeFile {
        peer_id: String::new(),
        listen_addrs: vec![],
        http: None,
        pid: 0,
    }
}

/// Runs the `colony` CLI with `args` (inside `netns` if given) and returns its stdout.
pub fn colony_cli(args: &[&str], netns: Option<&str>) -> anyhow::Result<String> {
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(colony_bin());
            c
        }
        None => Command::new(colony_bin()),
    };
    let out = cmd.args(args).output().context("cannot run colony")?;
    if !out.status.success() {
        bail!(
            "colony {args:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8(out.stdout)?)
}

/// `colony ARGS… --json --api http://127.0.0.1:8700 --token TOKEN` inside network namespace
/// `ns` (every namespaced node of the tests serves its API there), parsed.
pub fn netns_cli_json(ns: &str, token: &str, args: &[&str]) -> anyhow::Result<serde_json::Value> {
    let mut a = args.to_vec();
    a.extend(["--json", "--api", "http://127.0.0.1:8700", "--token", token]);
    Ok(serde_json::from_str(&colony_cli(&a, Some(ns))?)?)
}
