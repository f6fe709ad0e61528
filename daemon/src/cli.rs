//! The `colony` command line.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use libp2p::Multiaddr;

use crate::config::{NodeConfig, Reachability};
use crate::http::{GetView, PutBody};
use crate::node::Node;
use crate::swarm::actor::{NodeStatus, PeerSummary};

#[derive(Debug, Parser)]
#[command(
    name = "colony",
    version,
    about = "Colony: a peer-to-peer volunteer compute node"
)]
pub struct Cli {
    /// Log filter (tracing's EnvFilter syntax), e.g. "info" or "colony_daemon=debug".
    /// Default: "info" for `node`, "warn" for everything else.
    #[arg(long, global = true, env = "COLONY_LOG")]
    pub log: Option<String>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a node until SIGINT or SIGTERM.
    Node(NodeCommand),
    /// Create a node key (prints its peer id).
    Keygen {
        /// Where to write the key.
        #[arg(long, default_value = ".colony/node.key")]
        out: PathBuf,
        /// Replace an existing key (changes the node's identity).
        #[arg(long)]
        force: bool,
    },
    /// Store and read DHT records through a running node.
    Dht {
        #[command(subcommand)]
        command: DhtCommand,
    },
    /// Peers a running node is connected to.
    Peers(ApiArgs),
    /// A running node's status.
    Status {
        #[command(flatten)]
        api: ApiArgs,
        /// Redraw every this many seconds until Ctrl-C.
        #[arg(long)]
        watch: Option<f64>,
    },
    /// Ping a peer over peer RPC through a running node.
    Ping {
        /// The peer id.
        peer: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Join or start a collaborative pretraining run (ALBERT on a text corpus).
    Train(Box<crate::train_cli::TrainArgs>),
    /// Hogwild! inference on this machine: several workers of one model answer together.
    Infer(crate::infer_cli::InferArgs),
    /// Nearest-neighbour indexes: build one from a vector file, query it.
    Route {
        #[command(subcommand)]
        command: crate::route_cli::RouteCommand,
    },
    /// Editable models: train a digits classifier to be easy to patch.
    Edit {
        #[command(subcommand)]
        command: crate::edit_cli::EditCommand,
    },
    /// Patch jobs: ask the swarm to fix a model's answer, see the patch chain, roll back.
    Patch {
        #[command(subcommand)]
        command: crate::edit_cli::PatchCommand,
    },
    /// Start a small local swarm and show what it does.
    Demo(crate::demo::DemoArgs),
    /// Benchmark suites.
    Bench {
        #[command(subcommand)]
        suite: BenchSuite,
    },
}

#[derive(Debug, Subcommand)]
pub enum BenchSuite {
    /// DHT put/get latency and success, with and without churn.
    Dht(crate::bench::dht::DhtBenchArgs),
    /// Bandwidth-aware all-reduce between processes on shaped links (needs root).
    Allreduce(crate::bench::allreduce::AllreduceBenchArgs),
    /// Collaborative ALBERT pretraining: N peers on loopback vs one process, same batches.
    Train(crate::bench::train::TrainBenchArgs),
    /// Hogwild! decoding speed for several worker counts (native CPU decoder).
    Infer(crate::bench::infer::InferBenchArgs),
    /// Nearest-neighbour search: recall/QPS curves of the HNSW index on GloVe vs hnswlib and
    /// faiss, recall@1 under distance budgets.
    Route(crate::bench::route::RouteBenchArgs),
    /// Editable training on digits: baseline vs editable, 1000 edits, drawdown, patch size.
    Edit(crate::bench::edit::EditBenchArgs),
    /// One peer of `bench allreduce` (driven over stdin/stdout by the benchmark).
    #[command(hide = true)]
    AllreducePeer(crate::bench::allreduce::PeerArgs),
}

#[derive(Debug, Subcommand)]
pub enum DhtCommand {
    /// Store a value. Without --subkey it is owned by (signed with) the node's key.
    Put {
        key: String,
        value: String,
        #[arg(long)]
        subkey: Option<String>,
        /// Seconds until it expires.
        #[arg(long, default_value_t = 300)]
        ttl: u64,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Read every unexpired subkey under a key.
    Get {
        key: String,
        #[command(flatten)]
        api: ApiArgs,
    },
}

#[derive(Debug, Args)]
pub struct ApiArgs {
    /// The node's HTTP API.
    #[arg(long, env = "COLONY_API", default_value = "http://127.0.0.1:8700")]
    pub api: String,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// The API token of requests that change state (default: read from the data directory).
    #[arg(long, env = "COLONY_API_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// The node's data directory, where its API token is kept.
    #[arg(long = "data-dir", value_name = "DIR", default_value = ".colony")]
    pub token_dir: std::path::PathBuf,
}

impl ApiArgs {
    /// `rb` with the API token, when one is given or found.
    pub fn authorize(&self, rb: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        crate::http::authorize(rb, self.token.as_deref(), &self.token_dir)
    }
}

#[derive(Debug, Args)]
pub struct NodeArgs {
    /// TOML config file (flags and COLONY_* variables override it).
    #[arg(long, env = "COLONY_CONFIG")]
    pub config: Option<PathBuf>,
    #[arg(long, env = "COLONY_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Listen multiaddr (repeatable).
    #[arg(long, env = "COLONY_LISTEN", value_delimiter = ',')]
    pub listen: Vec<Multiaddr>,
    /// Bootstrap peer multiaddr with /p2p/<id> (repeatable).
    #[arg(long, env = "COLONY_BOOTSTRAP", value_delimiter = ',')]
    pub bootstrap: Vec<Multiaddr>,
    /// HTTP API address, or "off".
    #[arg(long, env = "COLONY_HTTP")]
    pub http: Option<String>,
    #[arg(long, env = "COLONY_REACHABILITY", value_enum)]
    pub reachability: Option<Reachability>,
    /// Relay to listen through when private (repeatable).
    #[arg(long = "relay", env = "COLONY_RELAYS", value_delimiter = ',')]
    pub relays: Vec<Multiaddr>,
}

/// `colony node`: the node's flags and what it serves.
#[derive(Debug, Args)]
pub struct NodeCommand {
    #[command(flatten)]
    pub node: NodeArgs,
    /// Serve Hogwild! inference jobs with this model (a GGUF file or a Hugging Face folder):
    /// peer RPC and the OpenAI-compatible `POST /v1/chat/completions`.
    #[arg(long, env = "COLONY_MODEL")]
    pub model: Option<PathBuf>,
    /// Inference jobs that may wait behind the running one (more are refused).
    #[arg(long)]
    pub infer_queue: Option<usize>,
}

impl NodeCommand {
    pub fn resolve(&self) -> anyhow::Result<NodeConfig> {
        let mut c = self.node.resolve()?;
        if let Some(m) = &self.model {
            c.infer = Some(crate::config::InferConfig {
                model: m.clone(),
                queue: 8,
                max_tokens: 2048,
            });
        }
        if let Some(q) = self.infer_queue {
            match c.infer.as_mut() {
                Some(i) => i.queue = q,
                None => bail!("--infer-queue needs --model (or [infer] in the config file)"),
            }
        }
        Ok(c)
    }
}

impl NodeArgs {
    /// The config file (or defaults) with flags and environment applied on top.
    pub fn resolve(&self) -> anyhow::Result<NodeConfig> {
        let mut c = match &self.config {
            Some(p) => NodeConfig::load(p)?,
            None => NodeConfig::default(),
        };
        if let Some(d) = &self.data_dir {
            c.data_dir = d.clone();
        }
        if !self.listen.is_empty() {
            c.listen = self.listen.clone();
        }
        if !self.bootstrap.is_empty() {
            c.bootstrap = self.bootstrap.clone();
        }
        if let Some(h) = &self.http {
            c.http = match h.as_str() {
                "off" | "none" | "" => None,
                s => Some(s.parse::<SocketAddr>().with_context(|| {
                    format!("--http {s:?} is not an address like 127.0.0.1:8700")
                })?),
            };
        }
        if let Some(r) = self.reachability {
            c.reachability = r;
        }
        if !self.relays.is_empty() {
            c.relays = self.relays.clone();
        }
        c.validate()?;
        Ok(c)
    }
}

impl Cli {
    /// The log filter to use: the flag, or a default that suits the command.
    pub fn log_filter(&self) -> String {
        match (&self.log, &self.command) {
            (Some(l), _) => l.clone(),
            (None, Command::Node(_)) => "info".into(),
            (None, Command::Train(_)) => "warn,colony_daemon::train=info".into(),
            (None, _) => "warn".into(),
        }
    }
}

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Node(args) => run_node(args).await,
        Command::Keygen { out, force } => {
            if out.exists() && !force {
                bail!(
                    "{} exists; pass --force to replace it (this changes the node's identity)",
                    out.display()
                );
            }
            let key = libp2p::identity::Keypair::generate_ed25519();
            crate::identity::write(&out, &key)?;
            println!("{}", key.public().to_peer_id());
            Ok(())
        }
        Command::Dht { command } => dht(command).await,
        Command::Peers(api) => {
            let peers: Vec<PeerSummary> = api_get(&api.api, "/api/peers").await?;
            if api.json {
                println!("{}", serde_json::to_string_pretty(&peers)?);
            } else {
                println!(
                    "{:<54} {:>8} {:>6} {:<22} address",
                    "peer", "rtt ms", "dht", "agent"
                );
                for p in peers {
                    println!(
                        "{:<54} {:>8} {:>6} {:<22} {}",
                        p.peer_id,
                        p.rtt_ms.map_or("-".into(), |r| format!("{r:.1}")),
                        if p.dht_server { "server" } else { "client" },
                        p.agent.unwrap_or_default(),
                        p.addresses.first().cloned().unwrap_or_default()
                    );
                }
            }
            Ok(())
        }
        Command::Status { api, watch } => {
            let Some(every) = watch else {
                let v = status_view(&api.api).await?;
                print_status(&v, api.json, false)?;
                return Ok(());
            };
            if !(every.is_finite() && every > 0.0) {
                anyhow::bail!("--watch wants a positive number of seconds");
            }
            loop {
                match status_view(&api.api).await {
                    Ok(v) => {
                        if !print_status(&v, api.json, !api.json)? {
                            return Ok(());
                        }
                    }
                    Err(e) => println!("{e:#}"),
                }
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => return Ok(()),
                    _ = tokio::time::sleep(Duration::from_secs_f64(every)) => {}
                }
            }
        }
        Command::Ping { peer, api } => {
            let v: serde_json::Value = api_send(
                api.authorize(reqwest::Client::new().post(format!("{}/api/ping/{peer}", api.api))),
            )
            .await?;
            if api.json {
                println!("{v}");
            } else {
                println!("{peer}: {:.2} ms", v["rtt_ms"].as_f64().unwrap_or(f64::NAN));
            }
            Ok(())
        }
        Command::Train(args) => crate::train_cli::run(*args).await,
        Command::Infer(args) => tokio::task::spawn_blocking(move || crate::infer_cli::run(args))
            .await
            .map_err(|e| anyhow::anyhow!("inference panicked: {e}"))?,
        Command::Route { command } => {
            tokio::task::spawn_blocking(move || crate::route_cli::run(command))
                .await
                .map_err(|e| anyhow::anyhow!("the route command panicked: {e}"))?
        }
        Command::Edit { command } => {
            tokio::task::spawn_blocking(move || crate::edit_cli::run_edit(command))
                .await
                .map_err(|e| anyhow::anyhow!("the edit command panicked: {e}"))?
        }
        Command::Patch { command } => crate::edit_cli::run_patch(command).await,
        Command::Demo(args) => crate::demo::run(args).await,
        Command::Bench {
            suite: BenchSuite::Edit(args),
        } => tokio::task::spawn_blocking(move || crate::bench::edit::run(args))
            .await
            .map_err(|e| anyhow::anyhow!("the benchmark panicked: {e}"))?,
        Command::Bench {
            suite: BenchSuite::Dht(args),
        } => crate::bench::dht::run(args).await,
        Command::Bench {
            suite: BenchSuite::Train(args),
        } => crate::bench::train::run(args).await,
        Command::Bench {
            suite: BenchSuite::Allreduce(args),
        } => crate::bench::allreduce::run(args).await,
        Command::Bench {
            suite: BenchSuite::Infer(args),
        } => tokio::task::spawn_blocking(move || crate::bench::infer::run(args))
            .await
            .map_err(|e| anyhow::anyhow!("the benchmark panicked: {e}"))?,
        Command::Bench {
            suite: BenchSuite::Route(args),
        } => tokio::task::spawn_blocking(move || crate::bench::route::run(args))
            .await
            .map_err(|e| anyhow::anyhow!("the benchmark panicked: {e}"))?,
        Command::Bench {
            suite: BenchSuite::AllreducePeer(args),
        } => crate::bench::allreduce::run_peer(args).await,
    }
}

async fn run_node(args: NodeCommand) -> anyhow::Result<()> {
    let config = args.resolve()?;
    let node = Node::start(config).await?;
    println!("peer id: {}", node.peer_id());
    for a in node.dial_addrs().await? {
        println!("listening: {a}");
    }
    if let Some(h) = node.http_addr {
        println!("http api: http://{h}");
    }
    let cancel = node.cancel_token();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("signal received, shutting down");
        cancel.cancel();
    });
    node.wait().await;
    tracing::info!("node stopped");
    Ok(())
}

/// Waits for SIGINT (Ctrl-C) or SIGTERM (systemd, Kubernetes, `docker stop`).
pub(crate) async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = match signal(SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
                return;
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}

async fn dht(cmd: DhtCommand) -> anyhow::Result<()> {
    match cmd {
        DhtCommand::Put {
            key,
            value,
            subkey,
            ttl,
            api,
        } => {
            let body = PutBody {
                value,
                subkey,
                ttl_s: ttl,
            };
            let report: serde_json::Value = api_send(
                api.authorize(
                    reqwest::Client::new()
                        .put(format!("{}/api/dht/{key}", api.api))
                        .json(&body),
                ),
            )
            .await?;
            if api.json {
                println!("{report}");
            } else {
                let n = report["stored"].as_array().map_or(0, |a| a.len());
                println!("stored {key} on {n} node(s)");
            }
            Ok(())
        }
        DhtCommand::Get { key, api } => {
            let view: GetView = api_get(&api.api, &format!("/api/dht/{key}")).await?;
            if api.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&serde_json::to_value(&view.entries)?)?
                );
            } else {
                if view.entries.is_empty() {
                    println!(
                        "{key}: nothing (asked {} node(s), {} answered)",
                        view.asked, view.answered
                    );
                }
                let now = crate::clock::now_ms();
                for e in view.entries {
                    let ttl = e.expires_at_ms.saturating_sub(now) / 1000;
                    println!(
                        "{:<40} {:<40} ttl {ttl:>5} s",
                        e.subkey,
                        e.value.unwrap_or_else(|| format!("0x{}", e.value_hex))
                    );
                }
            }
            Ok(())
        }
    }
}

async fn api_get<T: serde::de::DeserializeOwned>(base: &str, path: &str) -> anyhow::Result<T> {
    api_send(reqwest::Client::new().get(format!("{base}{path}"))).await
}

async fn api_send<T: serde::de::DeserializeOwned>(
    req: reqwest::RequestBuilder,
) -> anyhow::Result<T> {
    let resp = req
        .timeout(Duration::from_secs(60))
        .send()
        .await
        .context("cannot reach the node's HTTP API (is `colony node` running? see --api)")?;
    let status = resp.status();
    let body = resp.text().await.context("cannot read the API's answer")?;
    if !status.is_success() {
        let msg = serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v["error"].as_str().map(str::to_owned))
            .unwrap_or(body);
        bail!("the node answered {status}: {msg}");
    }
    serde_json::from_str(&body).with_context(|| format!("unexpected answer from the API: {body}"))
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    /// Clap checks a command's arguments (unique names, valid defaults) only when that
    /// command is parsed; this checks them all at once (a `--model` of `colony node` once
    /// clashed with `colony train`'s, which flattens the node's flags).
    #[test]
    fn every_command_line_is_well_formed() {
        super::Cli::command().debug_assert();
    }
}

/// What `colony status` shows: the node, its peers and what its services hold.
#[derive(Debug, serde::Serialize)]
struct StatusView {
    #[serde(flatten)]
    status: NodeStatus,
    peers: Vec<PeerSummary>,
    /// The patch chain (`/api/patch/list`), when the node holds an editable model.
    patch: Option<serde_json::Value>,
    /// Inference jobs, when the node serves a model.
    infer_jobs: Option<Vec<serde_json::Value>>,
    /// Index shards the node serves.
    route_shards: Option<Vec<serde_json::Value>>,
    /// Training runs the node takes part in, each with its last step (`/api/runs?points=1`).
    runs: Vec<serde_json::Value>,
}

async fn status_view(base: &str) -> anyhow::Result<StatusView> {
    let status: NodeStatus = api_get(base, "/api/status").await?;
    let peers: Vec<PeerSummary> = api_get(base, "/api/peers").await?;
    // Services a node does not run answer 404: shown as absent.
    let patch = api_get(base, "/api/patch/list").await.ok();
    let infer_jobs = api_get(base, "/api/infer/jobs").await.ok();
    let route_shards: Option<Vec<serde_json::Value>> = api_get(base, "/api/route/shards")
        .await
        .ok()
        .filter(|v: &Vec<_>| !v.is_empty());
    let runs = api_get(base, "/api/runs?points=1")
        .await
        .unwrap_or_default();
    Ok(StatusView {
        status,
        peers,
        patch,
        infer_jobs,
        route_shards,
        runs,
    })
}

fn render_status(v: &StatusView, json: bool) -> anyhow::Result<String> {
    use std::fmt::Write as _;
    let mut o = String::new();
    if json {
        return Ok(serde_json::to_string_pretty(v)? + "\n");
    }
    let s = &v.status;
    let _ = writeln!(
        o,
        "peer id      {}\nagent        {}\nuptime       {} s\nservices     {}",
        s.peer_id,
        s.agent,
        s.uptime_s,
        s.services.join(", ")
    );
    let _ = writeln!(
        o,
        "dht mode     {}\npeers        {} connected, {} in routing table",
        s.dht_mode, s.connected_peers, s.routing_table_peers
    );
    let _ = writeln!(
        o,
        "dht store    {} entries, {} bytes",
        s.dht_entries, s.dht_bytes
    );
    let _ = writeln!(o, "listening    {}", s.listen_addrs.join(" "));
    let _ = writeln!(
        o,
        "offences     {} (banned: {})",
        s.offences,
        s.banned_peers.len()
    );
    let mut peers: Vec<&PeerSummary> = v.peers.iter().collect();
    peers.sort_by(|a, b| {
        a.rtt_ms
            .unwrap_or(f64::MAX)
            .total_cmp(&b.rtt_ms.unwrap_or(f64::MAX))
    });
    for p in peers.iter().take(8) {
        let _ = writeln!(
            o,
            "  peer {}  {}  {}{}",
            p.peer_id,
            p.rtt_ms
                .map_or("rtt ?".into(), |r| format!("rtt {r:.1} ms")),
            p.agent.as_deref().unwrap_or("?"),
            if p.strikes > 0 {
                format!("  strikes {}", p.strikes)
            } else {
                String::new()
            }
        );
    }
    if peers.len() > 8 {
        let _ = writeln!(o, "  ... and {} more", peers.len() - 8);
    }
    for r in &v.runs {
        let swarm = &r["swarm"];
        let last = r["history"]
            .as_array()
            .and_then(|h| h.last())
            .map(|p| {
                format!(
                    "; last step {} {}, loss {}",
                    p["epoch"],
                    p["kind"].as_str().unwrap_or("?"),
                    p["loss"].as_f64().map_or("?".into(), |l| format!("{l:.3}"))
                )
            })
            .unwrap_or_default();
        let _ = writeln!(
            o,
            "training     {} at step {}{}: swarm {} peers, {}/{} samples{last}",
            r["run"].as_str().unwrap_or("?"),
            r["epoch"],
            if r["active"] == false { " (left)" } else { "" },
            swarm["peers"].as_u64().unwrap_or(0),
            swarm["samples"].as_u64().unwrap_or(0),
            r["target_batch"]
        );
    }
    if let Some(p) = &v.patch {
        let _ = writeln!(
            o,
            "patches      model {}  version {}  {} applied  control error {:.2}%",
            p["model"].as_str().unwrap_or("?").get(..12).unwrap_or("?"),
            p["version"]
                .as_str()
                .unwrap_or("?")
                .get(..12)
                .unwrap_or("?"),
            p["len"],
            p["control_error"].as_f64().unwrap_or(f64::NAN) * 100.0
        );
    }
    if let Some(jobs) = &v.infer_jobs {
        let running = jobs.iter().filter(|j| j["state"] == "running").count();
        let queued = jobs.iter().filter(|j| j["state"] == "queued").count();
        let _ = writeln!(
            o,
            "inference    {} jobs ({running} running, {queued} queued)",
            jobs.len()
        );
    }
    if let Some(shards) = &v.route_shards {
        let names: Vec<String> = shards
            .iter()
            .map(|r| format!("{}#{}", r["index"].as_str().unwrap_or("?"), r["shard"]))
            .collect();
        let _ = writeln!(o, "route        {}", names.join(" "));
    }
    Ok(o)
}

/// Prints the status; `Ok(false)` when stdout is closed (a pipe reader went away).
fn print_status(v: &StatusView, json: bool, clear: bool) -> anyhow::Result<bool> {
    use std::io::Write as _;
    let mut text = render_status(v, json)?;
    if clear {
        text.insert_str(0, "\x1b[2J\x1b[H");
    }
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// A progress bar on standard error for long CLI work (`len` units of `what`); it draws only
/// when standard error is a terminal, so scripts and `--json` output see nothing of it.
pub fn progress_bar(len: u64, what: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(len);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {wide_bar} {human_pos}/{human_len} {msg} (eta {eta})",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_message(what.to_string());
    bar
}
