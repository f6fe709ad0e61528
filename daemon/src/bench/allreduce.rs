//! `colony bench allreduce`: DeDLOC's bandwidth-aware all-reduce between real `colony`
//! processes, each in its own network namespace on one bridge, with its upload shaped by tbf
//! on its interface and its download by tbf on an ifb device (profiles in
//! `shared/benchmarks.md`).
//!
//! Per profile: start the peers (`colony bench allreduce-peer`, driven over stdin/stdout
//! with JSON lines), connect them, let each measure its own bandwidth with probes (one peer
//! at a time, so probes do not disturb each other), then run one warm-up round and `rounds`
//! measured rounds. Each round is real: declarations in the DHT, a leader's commit, the
//! butterfly all-reduce over `/colony/allreduce/1`. Each peer checks its result against the
//! exact weighted mean, recomputed from every member's (deterministic) vector.
//!
//! Makespan: from the first member starting the round (after the commit) until the last one
//! holds the full result, on the host's clock, which all namespaces share. The lower bound is
//! `research/dedloc.md` §6 on the shaped rates; `butterfly_bound_s` is the best any butterfly
//! split can do on them.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc as std_mpsc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use colony_trainer::allreduce::balance::{Link, PeerMode, lower_bound_per_byte, optimal_split};
use colony_trainer::allreduce::compression::Compression;
use libp2p::{Multiaddr, PeerId};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::io::AsyncBufReadExt;
use tokio::time::Instant;

use super::write_json;
use crate::allreduce::{DriveConfig, Transfers, run_round_measured};
use crate::bandwidth::Monitor;
use crate::clock::now_ms;
use crate::config::{NodeConfig, Reachability};
use crate::matchmaking::{MatchConfig, Matchmaker, Offer};
use crate::netlab::{self, NetLab};
use crate::node::Node;
use colony_trainer::allreduce::partition::{PartLen, PartRule};

#[derive(Debug, Args)]
pub struct AllreduceBenchArgs {
    /// Profiles to run: uniform, hetero, asym, clients (comma-separated).
    #[arg(
        long,
        default_value = "uniform,hetero,asym,clients",
        value_delimiter = ','
    )]
    pub profile: Vec<String>,
    /// Elements (f32) in the averaged vector.
    #[arg(long, default_value_t = 16 * 1024 * 1024)]
    pub floats: usize,
    /// Measured rounds per profile (after one warm-up round).
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// none, fp16 or int8.
    #[arg(long, default_value = "none")]
    pub compression: String,
    /// quic or tcp.
    #[arg(long, default_value = "quic")]
    pub transport: String,
    /// Multiplies every profile's link rates (e.g. 0.1 for a quick run).
    #[arg(long, default_value_t = 1.0)]
    pub scale: f64,
    /// Elements per streamed part; by default the leader picks it from the group's
    /// bandwidths (`partition::auto_part_len`).
    #[arg(long)]
    pub part_floats: Option<usize>,
    /// How long each bandwidth probe (upload, then download) runs, milliseconds.
    #[arg(long, default_value_t = 2000)]
    pub probe_ms: u64,
    /// All-reduce messages in flight to one peer.
    #[arg(long, default_value_t = DriveConfig::default().window)]
    pub window: usize,
    /// Network number of the namespaces (10.<net>.0.0/24).
    #[arg(long, default_value_t = 91)]
    pub net: u8,
    /// Also run hivemind 1.1.12's DecentralizedAverager on the same namespaces and shaping
    /// (needs `scripts/hivemind-venv.sh` to have set up its virtualenv).
    #[arg(long)]
    pub hivemind: bool,
    /// The hivemind virtualenv's python.
    #[arg(long, default_value = ".cache/hivemind-venv/bin/python")]
    pub hivemind_python: PathBuf,
    /// Write results as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Keep the peers' logs in this directory (default: a temporary one, removed).
    #[arg(long)]
    pub logs: Option<PathBuf>,
}

/// One peer's shaped link, Mbit/s.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct LinkSpec {
    pub up_mbit: f64,
    pub down_mbit: f64,
    pub mode: &'static str,
}

/// The peers of a named profile.
pub fn profile(name: &str) -> anyhow::Result<Vec<LinkSpec>> {
    let node = |up: f64, down: f64| LinkSpec {
        up_mbit: up,
        down_mbit: down,
        mode: "node",
    };
    let hetero = [400.0, 200.0, 100.0, 100.0, 50.0, 50.0, 25.0, 25.0];
    Ok(match name {
        "uniform" => vec![node(100.0, 100.0); 8],
        "hetero" => hetero.iter().map(|&b| node(b, b)).collect(),
        "asym" => vec![node(20.0, 100.0); 8],
        "clients" => hetero
            .iter()
            .enumerate()
            .map(|(i, &b)| LinkSpec {
                mode: if i >= 6 { "client" } else { "node" },
                ..node(b, b)
            })
            .collect(),
        other => bail!("unknown profile {other:?} (uniform, hetero, asym, clients)"),
    })
}

fn mode_of(s: &str) -> anyhow::Result<PeerMode> {
    Ok(match s {
        "node" => PeerMode::Node,
        "client" => PeerMode::Client,
        "aux" => PeerMode::Aux,
        other => bail!("unknown peer mode {other:?} (node, client, aux)"),
    })
}

pub fn compression_named(s: &str) -> anyhow::Result<Compression> {
    Ok(match s {
        "none" => Compression::None,
        "fp16" => Compression::Fp16,
        "int8" => Compression::Uint8Blockwise { block: 1024 },
        other => bail!("unknown compression {other:?} (none, fp16, int8)"),
    })
}

/// The time bounds of one profile for a vector of `bytes` bytes: (lower bound for any
/// algorithm, best butterfly split).
pub fn bounds(links: &[LinkSpec], bytes: f64, scale: f64) -> anyhow::Result<(f64, f64)> {
    let links: Vec<Link> = links
        .iter()
        .map(|l| {
            Ok(Link {
                up: l.up_mbit * scale * 1e6 / 8.0,
                down: l.down_mbit * scale * 1e6 / 8.0,
                mode: mode_of(l.mode)?,
            })
        })
        .collect::<anyhow::Result<_>>()?;
    let bf = optimal_split(&links)?.time_per_byte * bytes;
    Ok((lower_bound_per_byte(&links) * bytes, bf))
}

/// One profile's result.
#[derive(Debug, Serialize)]
pub struct AllreduceCase {
    pub profile: String,
    pub peers: usize,
    pub vector_bytes: u64,
    pub compression: String,
    pub transport: String,
    pub links: Vec<LinkSpec>,
    /// Each peer's probed (up, down), Mbit/s.
    pub measured_mbit: Vec<(f64, f64)>,
    /// Each peer's (up, down) estimate after the last round, Mbit/s: the probe's, raised
    /// where the rounds' own transfers showed more.
    pub estimated_mbit: Vec<(f64, f64)>,
    /// Each member's shard, elements, in the last round.
    pub shards: Vec<u64>,
    /// Elements per part in the last round (the leader's choice unless `--part-floats`).
    pub part_len: u64,
    pub makespan_s: f64,
    pub makespans_s: Vec<f64>,
    pub lower_bound_s: f64,
    pub butterfly_bound_s: f64,
    pub ratio_to_bound: f64,
    pub max_abs_err: f64,
    /// Rounds in which some peer could not average some part (a failed sender or aggregator).
    pub incomplete_rounds: usize,
    /// Measured rounds in which matchmaking left a peer out (not timed).
    pub short_rounds: usize,
    pub hivemind_makespan_s: Option<f64>,
    pub hivemind_makespans_s: Vec<f64>,
    /// hivemind's largest error against the exact mean, and the measured rounds in which some
    /// peer ended with values off by more than 1e-3 although its step reported success.
    pub hivemind_max_abs_err: Option<f64>,
    pub hivemind_wrong_rounds: usize,
}

/// What hivemind did over the measured rounds.
#[derive(Debug, Default)]
struct HivemindRuns {
    spans: Vec<f64>,
    max_err: Option<f64>,
    wrong_rounds: usize,
}

/// Values of peer `index`'s vector in round `epoch`: deterministic, in [-1, 1).
pub fn peer_vector(seed: u64, index: usize, epoch: u64, len: usize) -> Vec<f32> {
    let mut x = seed ^ (index as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (epoch << 40);
    (0..len)
        .map(|_| {
            // splitmix64
            x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^= z >> 31;
            ((z >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

struct Peer {
    child: Child,
    stdin: ChildStdin,
    lines: std_mpsc::Receiver<Value>,
    index: usize,
}

impl Peer {
    fn send(&mut self, v: &Value) -> anyhow::Result<()> {
        writeln!(self.stdin, "{v}").with_context(|| format!("peer {} is gone", self.index))?;
        self.stdin.flush()?;
        Ok(())
    }

    fn expect(&mut self, event: &str, timeout: Duration) -> anyhow::Result<Value> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let v = self.lines.recv_timeout(left).map_err(|_| {
                anyhow::anyhow!("peer {} sent no {event:?} within {timeout:?}", self.index)
            })?;
            if v["event"] == "error" {
                bail!("peer {}: {}", self.index, v["message"]);
            }
            if v["event"] == event {
                return Ok(v);
            }
        }
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn_peer(
    lab: &NetLab,
    i: usize,
    link: &LinkSpec,
    args: &AllreduceBenchArgs,
    bootstrap: Option<&str>,
    logs: &Path,
) -> anyhow::Result<Peer> {
    let exe = std::env::current_exe().context("cannot find the colony binary")?;
    let host = &lab.hosts[i];
    let listen = match args.transport.as_str() {
        "quic" => format!("/ip4/{}/udp/4001/quic-v1", host.ip),
        "tcp" => format!("/ip4/{}/tcp/4001", host.ip),
        other => bail!("unknown transport {other:?} (quic, tcp)"),
    };
    let log = std::fs::File::create(logs.join(format!("peer-{i}.log")))?;
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &host.ns])
        .arg(&exe)
        .args(["bench", "allreduce-peer"])
        .args(["--index", &i.to_string()])
        .args(["--mode", link.mode])
        .args(["--floats", &args.floats.to_string()])
        .args(["--compression", &args.compression])
        .args(["--window", &args.window.to_string()])
        .args([
            "--data-dir",
            &logs.join(format!("peer-{i}")).to_string_lossy(),
        ]);
    if let Some(p) = args.part_floats {
        cmd.args(["--part-floats", &p.to_string()]);
    }
    if link.mode != "client" {
        cmd.args(["--listen", &listen]);
    }
    if let Some(b) = bootstrap {
        cmd.args(["--bootstrap", b]);
    }
    // The peers' log filter (the CLI reads COLONY_LOG): matchmaking decisions at info, so a
    // round that leaves someone out can be explained from the logs.
    if std::env::var_os("COLONY_LOG").is_none() {
        cmd.env("COLONY_LOG", "warn,colony_daemon::matchmaking=info");
    }
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .context("cannot start a bench peer")?;
    let stdin = child.stdin.take().context("no stdin")?;
    let stdout = child.stdout.take().context("no stdout")?;
    let (tx, lines) = std_mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Ok(v) = serde_json::from_str::<Value>(&line)
                && tx.send(v).is_err()
            {
                return;
            }
        }
    });
    Ok(Peer {
        child,
        stdin,
        lines,
        index: i,
    })
}

fn median(xs: &[f64]) -> f64 {
    super::percentile(xs, 50.0)
}

/// Runs the suite (needs root: namespaces and tc).
pub async fn run(args: AllreduceBenchArgs) -> anyhow::Result<()> {
    if !netlab::available() {
        bail!("colony bench allreduce needs root and iproute2 (network namespaces and tc)");
    }
    compression_named(&args.compression)?;
    let tmp = tempfile::tempdir()?;
    let logs = args.logs.clone().unwrap_or_else(|| tmp.path().to_owned());
    std::fs::create_dir_all(&logs)?;
    let mut cases = Vec::new();
    for name in &args.profile {
        let links = profile(name)?;
        let dir = logs.join(name);
        std::fs::create_dir_all(&dir)?;
        let args2 = &args;
        let case = tokio::task::block_in_place(|| run_profile(name, &links, args2, &dir))
            .with_context(|| format!("profile {name} (peer logs in {})", dir.display()))?;
        print_case(&case);
        cases.push(case);
        // After every profile, so a later failure loses nothing.
        if let Some(path) = &args.json {
            write_json(path, "allreduce", &cases)?;
        }
    }
    if args.logs.is_none() {
        drop(tmp);
    }
    Ok(())
}

fn print_case(c: &AllreduceCase) {
    println!(
        "{:<8} peers {} {:>6.1} MiB {:<5} makespan {:>7.2} s  bound {:>6.2} s  ratio {:>5.2}  butterfly {:>6.2} s  max_err {:.2e}  incomplete {}{}",
        c.profile,
        c.peers,
        c.vector_bytes as f64 / (1 << 20) as f64,
        c.compression,
        c.makespan_s,
        c.lower_bound_s,
        c.ratio_to_bound,
        c.butterfly_bound_s,
        c.max_abs_err,
        c.incomplete_rounds,
        c.hivemind_makespan_s
            .map(|h| format!(
                "  hivemind {h:.2} s ({:.2}x slower, max_err {:.2e}, wrong rounds {})",
                h / c.makespan_s,
                c.hivemind_max_abs_err.unwrap_or(f64::NAN),
                c.hivemind_wrong_rounds
            ))
            .unwrap_or_default()
    );
}

fn run_profile(
    name: &str,
    links: &[LinkSpec],
    args: &AllreduceBenchArgs,
    logs: &Path,
) -> anyhow::Result<AllreduceCase> {
    let n = links.len();
    let lab = NetLab::new(&format!("ab{}", args.net), args.net, n)?;
    for (i, l) in links.iter().enumerate() {
        let bps = |mbit: f64| (mbit * args.scale * 1e6).round() as u64;
        lab.shape(i, bps(l.up_mbit), bps(l.down_mbit))?;
    }
    let mut peers: Vec<Peer> = Vec::new();
    let mut infos: Vec<Value> = Vec::new();
    let mut boot: Option<String> = None;
    for (i, l) in links.iter().enumerate() {
        let mut p = spawn_peer(&lab, i, l, args, boot.as_deref(), logs)?;
        let ready = p.expect("ready", Duration::from_secs(30))?;
        if boot.is_none() {
            boot = ready["addrs"][0].as_str().map(str::to_owned);
            if boot.is_none() {
                bail!("peer 0 listens nowhere");
            }
        }
        infos.push(ready);
        peers.push(p);
    }
    let roster = json!({"cmd": "connect", "peers": infos});
    for p in &mut peers {
        p.send(&roster)?;
    }
    for p in &mut peers {
        p.expect("connected", Duration::from_secs(30))?;
    }
    // Probes one peer at a time, each against all others.
    let mut measured = Vec::new();
    for p in &mut peers {
        p.send(&json!({"cmd": "probe", "ms": args.probe_ms}))?;
        let v = p.expect("probed", Duration::from_secs(60))?;
        let mbit = |k: &str| v[k].as_f64().unwrap_or(f64::NAN) * 8.0 / 1e6;
        measured.push((mbit("up"), mbit("down")));
    }
    let comp = compression_named(&args.compression)?;
    let bytes = comp.encoded_len(args.floats) as f64;
    let (lower, butterfly) = bounds(links, bytes, args.scale)?;
    let mut makespans = Vec::new();
    let mut max_err: f64 = 0.0;
    let mut incomplete = 0;
    let mut short_rounds = 0;
    let mut shards = Vec::new();
    let mut estimated = Vec::new();
    let mut part_len = 0;
    let round_timeout = Duration::from_secs_f64(60.0 + 20.0 * butterfly);
    for epoch in 0..=args.rounds as u64 {
        let deadline = now_ms() + 3000;
        for p in &mut peers {
            p.send(&json!({"cmd": "round", "epoch": epoch, "deadline_ms": deadline}))?;
        }
        let mut reports = Vec::new();
        for p in &mut peers {
            reports.push(p.expect("round", round_timeout)?);
        }
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(logs.join("rounds.jsonl"))?;
        for r in &reports {
            writeln!(f, "{r}")?;
        }
        let members: Vec<&Value> = reports.iter().filter(|r| r["members"] != 0).collect();
        if members.len() != n {
            // Matchmaking left someone out: the round says nothing about the all-reduce's
            // speed, but it is a fault to report.
            tracing::warn!(
                profile = name,
                epoch,
                "only {} of {n} peers in the group",
                members.len()
            );
            if epoch > 0 {
                short_rounds += 1;
            }
            continue;
        }
        let start = members
            .iter()
            .filter_map(|r| r["start_ms"].as_u64())
            .min()
            .context("no start")?;
        let end = members
            .iter()
            .filter_map(|r| r["end_ms"].as_u64())
            .max()
            .context("no end")?;
        let span = (end - start) as f64 / 1000.0;
        let err = members
            .iter()
            .map(|r| r["max_abs_err"].as_f64().unwrap_or(f64::INFINITY))
            .fold(0.0, f64::max);
        let failed = members.iter().any(|r| {
            r["failed_aggregators"]
                .as_array()
                .is_some_and(|a| !a.is_empty())
                || r["failed_senders"]
                    .as_array()
                    .is_some_and(|a| !a.is_empty())
        });
        tracing::info!(profile = name, epoch, span, err, failed, "round");
        if epoch > 0 {
            makespans.push(span);
            max_err = max_err.max(err);
            incomplete += usize::from(failed);
        }
        shards = reports[0]["shards"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_u64).collect())
            .unwrap_or_default();
        part_len = reports[0]["part_len"].as_u64().unwrap_or(0);
        let mbit = |v: &Value| v.as_f64().unwrap_or(f64::NAN) * 8.0 / 1e6;
        estimated = reports
            .iter()
            .map(|r| (mbit(&r["up_est"]), mbit(&r["down_est"])))
            .collect();
    }
    for p in &mut peers {
        let _ = p.send(&json!({"cmd": "quit"}));
    }
    drop(peers);
    let hivemind = if args.hivemind {
        hivemind_rounds(&lab, links, args, logs)?
    } else {
        HivemindRuns::default()
    };
    let makespan = median(&makespans);
    Ok(AllreduceCase {
        profile: name.to_owned(),
        peers: n,
        vector_bytes: bytes as u64,
        compression: args.compression.clone(),
        transport: args.transport.clone(),
        links: links.to_vec(),
        measured_mbit: measured,
        estimated_mbit: estimated,
        shards,
        part_len,
        makespan_s: makespan,
        makespans_s: makespans,
        lower_bound_s: lower,
        butterfly_bound_s: butterfly,
        ratio_to_bound: makespan / lower,
        max_abs_err: max_err,
        incomplete_rounds: incomplete,
        short_rounds,
        hivemind_makespan_s: (!hivemind.spans.is_empty()).then(|| median(&hivemind.spans)),
        hivemind_makespans_s: hivemind.spans,
        hivemind_max_abs_err: hivemind.max_err,
        hivemind_wrong_rounds: hivemind.wrong_rounds,
    })
}

/// Runs `scripts/hivemind_allreduce.py` in every namespace (same shaping, same vector size)
/// and returns its makespans.
fn hivemind_rounds(
    lab: &NetLab,
    links: &[LinkSpec],
    args: &AllreduceBenchArgs,
    logs: &Path,
) -> anyhow::Result<HivemindRuns> {
    let script = Path::new("scripts/hivemind_allreduce.py");
    if !script.exists() || !args.hivemind_python.exists() {
        bail!(
            "hivemind comparison needs {} and {} (run scripts/hivemind-venv.sh)",
            script.display(),
            args.hivemind_python.display()
        );
    }
    let n = links.len();
    let start_at = now_ms() + 30_000;
    let mut children = Vec::new();
    let mut boot: Option<String> = None;
    for (i, l) in links.iter().enumerate() {
        let out = logs.join(format!("hivemind-{i}.json"));
        let _ = std::fs::remove_file(&out);
        let log = std::fs::File::create(logs.join(format!("hivemind-{i}.log")))?;
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &lab.hosts[i].ns])
            .arg(&args.hivemind_python)
            .arg(script)
            .args(["--index", &i.to_string(), "--peers", &n.to_string()])
            .args(["--host", &lab.hosts[i].ip])
            .args(["--floats", &args.floats.to_string()])
            .args(["--rounds", &(args.rounds + 1).to_string()])
            .args([
                "--bandwidth",
                &(l.up_mbit.min(l.down_mbit) * args.scale).to_string(),
            ])
            .args(["--start-at-ms", &start_at.to_string()])
            .args(["--out", &out.to_string_lossy()]);
        if l.mode == "client" {
            cmd.arg("--client");
        }
        if let Some(b) = &boot {
            cmd.args(["--bootstrap", b]);
        }
        let child = cmd
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .context("cannot start a hivemind peer")?;
        let mut child = KillOnDrop(child);
        if i == 0 {
            // Peer 0 prints its multiaddr first.
            let stdout = child.0.stdout.take().context("no stdout")?;
            let mut line = String::new();
            BufReader::new(stdout).read_line(&mut line)?;
            let addr = line.trim().to_owned();
            if addr.is_empty() {
                bail!("hivemind peer 0 printed no address (see hivemind-0.log)");
            }
            boot = Some(addr);
        }
        children.push(child);
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(600);
    for c in &mut children {
        loop {
            if c.0.try_wait()?.is_some() {
                break;
            }
            if std::time::Instant::now() > deadline {
                bail!("hivemind peers did not finish in 10 minutes");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    // Per round: start = min over peers, end = max over peers.
    let mut per_peer = Vec::new();
    for i in 0..n {
        let text = std::fs::read_to_string(logs.join(format!("hivemind-{i}.json")))
            .with_context(|| format!("hivemind peer {i} wrote no result (see its log)"))?;
        let v: Value = serde_json::from_str(&text)?;
        per_peer.push(v);
    }
    let mut runs = HivemindRuns::default();
    for r in 1..=args.rounds {
        let mut start = f64::INFINITY;
        let mut end: f64 = 0.0;
        let mut wrong = false;
        for v in &per_peer {
            let round = &v["rounds"][r];
            if round["ok"] != true {
                continue;
            }
            start = start.min(round["start"].as_f64().unwrap_or(f64::INFINITY));
            end = end.max(round["end"].as_f64().unwrap_or(0.0));
            if let Some(e) = round["max_abs_err"].as_f64() {
                runs.max_err = Some(runs.max_err.map_or(e, |m: f64| m.max(e)));
                wrong |= e > 1e-3;
            }
        }
        if start.is_finite() && end > start {
            runs.spans.push(end - start);
        }
        runs.wrong_rounds += usize::from(wrong);
    }
    Ok(runs)
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The hidden peer side of the benchmark.
#[derive(Debug, Args)]
pub struct PeerArgs {
    #[arg(long)]
    pub index: usize,
    #[arg(long, default_value = "node")]
    pub mode: String,
    #[arg(long)]
    pub listen: Option<Multiaddr>,
    #[arg(long)]
    pub bootstrap: Option<Multiaddr>,
    #[arg(long)]
    pub floats: usize,
    #[arg(long)]
    pub part_floats: Option<usize>,
    #[arg(long, default_value = "none")]
    pub compression: String,
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
    #[arg(long)]
    pub data_dir: PathBuf,
    #[arg(long, default_value_t = DriveConfig::default().window)]
    pub window: usize,
    /// Declared upload cap, Mbit/s (an upper bound on the measured rate).
    #[arg(long)]
    pub cap_up_mbit: Option<f64>,
    #[arg(long)]
    pub cap_down_mbit: Option<f64>,
}

#[derive(Debug, Deserialize)]
struct RosterEntry {
    index: usize,
    peer: String,
    #[serde(default)]
    addrs: Vec<String>,
}

fn say(v: Value) {
    println!("{v}");
}

/// Runs one bench peer until told to quit (or stdin closes).
pub async fn run_peer(args: PeerArgs) -> anyhow::Result<()> {
    match peer_main(&args).await {
        Ok(()) => Ok(()),
        Err(e) => {
            say(json!({"event": "error", "message": format!("{e:#}")}));
            Err(e)
        }
    }
}

async fn peer_main(args: &PeerArgs) -> anyhow::Result<()> {
    let mode = mode_of(&args.mode)?;
    let compression = compression_named(&args.compression)?;
    let mut cfg = NodeConfig::loopback(&args.data_dir);
    cfg.listen = args.listen.iter().cloned().collect();
    cfg.bootstrap = args.bootstrap.iter().cloned().collect();
    cfg.reachability = if mode == PeerMode::Client {
        Reachability::Private
    } else {
        Reachability::Public
    };
    cfg.dht.announce_interval_s = 0;
    cfg.dht.replicate_interval_s = 0;
    let node = Node::start(cfg).await?;
    let h = node.handle.clone();
    let addrs: Vec<String> = node
        .dial_addrs()
        .await?
        .iter()
        .map(ToString::to_string)
        .collect();
    say(
        json!({"event": "ready", "index": args.index, "peer": h.peer_id().to_string(), "addrs": addrs}),
    );
    let mm = Matchmaker::new(h.clone(), "bench").await?;
    let mut roster: Vec<(usize, PeerId)> = Vec::new();
    let mut bw = Monitor::new(
        args.cap_up_mbit.map(|m| m * 1e6 / 8.0),
        args.cap_down_mbit.map(|m| m * 1e6 / 8.0),
    );
    let mcfg = MatchConfig {
        part_len: match args.part_floats {
            Some(n) => PartLen::Fixed(n),
            None => PartLen::Auto(PartRule {
                window: args.window,
                ..PartRule::default()
            }),
        },
        compression,
        ..MatchConfig::default()
    };
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    while let Some(line) = lines.next_line().await? {
        let cmd: Value = serde_json::from_str(&line).context("a command is not JSON")?;
        match cmd["cmd"].as_str() {
            Some("connect") => {
                let list: Vec<RosterEntry> = serde_json::from_value(cmd["peers"].clone())?;
                for e in list {
                    let peer: PeerId = e.peer.parse()?;
                    if peer != h.peer_id() {
                        for a in &e.addrs {
                            let _ = h.dial(a.parse()?).await;
                        }
                    }
                    roster.push((e.index, peer));
                }
                say(json!({"event": "connected"}));
            }
            Some("probe") => {
                let others: Vec<PeerId> = roster
                    .iter()
                    .map(|(_, p)| *p)
                    .filter(|p| *p != h.peer_id())
                    .collect();
                let dur = Duration::from_millis(cmd["ms"].as_u64().unwrap_or(2000));
                // Probed in turn, one peer at a time, by the orchestrator's command (so the
                // probes do not share links); rounds then refine the estimates.
                bw.probe(&h, &others, dur).await;
                say(json!({"event": "probed", "up": bw.up.get(), "down": bw.down.get()}));
            }
            Some("round") => {
                let epoch = cmd["epoch"].as_u64().context("round without epoch")?;
                let at = cmd["deadline_ms"]
                    .as_u64()
                    .context("round without deadline")?;
                let deadline = Instant::now() + Duration::from_millis(at.saturating_sub(now_ms()));
                let report = bench_round(
                    &h, &mm, &mcfg, args, mode, epoch, deadline, &roster, &mut bw,
                )
                .await?;
                say(report);
            }
            Some("quit") => break,
            other => bail!("unknown command {other:?}"),
        }
    }
    mm.close().await;
    node.shutdown().await;
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn bench_round(
    h: &crate::NodeHandle,
    mm: &Matchmaker,
    mcfg: &MatchConfig,
    args: &PeerArgs,
    mode: PeerMode,
    epoch: u64,
    deadline: Instant,
    roster: &[(usize, PeerId)],
    bw: &mut Monitor,
) -> anyhow::Result<Value> {
    let weight = 1.0 + args.index as f64;
    let offer = Offer {
        mode,
        weight,
        up: bw.up.get().unwrap_or(100e6 / 8.0),
        down: bw.down.get().unwrap_or(100e6 / 8.0),
    };
    let vector = if mode.sends() {
        peer_vector(args.seed, args.index, epoch, args.floats)
    } else {
        vec![0.0; args.floats]
    };
    let Some(group) = mm
        .form_group(epoch, args.floats, offer, deadline, mcfg)
        .await?
    else {
        return Ok(json!({"event": "round", "epoch": epoch, "members": 0}));
    };
    let start_ms = now_ms();
    let drive = DriveConfig {
        window: args.window,
        ..DriveConfig::default()
    };
    let (report, transfers) = run_round_measured(h, &group, vector, drive).await?;
    let end_ms = now_ms();
    bw.observe_round(&transfers);
    // The oracle: the exact weighted mean over the members that send data.
    let max_abs_err = match &report.result {
        Some(result) => {
            let mut sum = vec![0f64; args.floats];
            let mut total = 0.0;
            for (k, peer) in group.members.iter().enumerate() {
                let w = group.spec.weights[k];
                if !group.spec.modes[k].sends() || w <= 0.0 {
                    continue;
                }
                let idx = roster
                    .iter()
                    .find(|(_, p)| p == peer)
                    .map(|(i, _)| *i)
                    .context("a member is not in the roster")?;
                for (s, x) in sum
                    .iter_mut()
                    .zip(peer_vector(args.seed, idx, epoch, args.floats))
                {
                    *s += w * f64::from(x);
                }
                total += w;
            }
            result
                .iter()
                .zip(&sum)
                .map(|(r, s)| (f64::from(*r) - s / total).abs())
                .fold(0.0, f64::max)
        }
        None => 0.0,
    };
    Ok(json!({
        "event": "round",
        "index": args.index,
        "epoch": epoch,
        "members": group.members.len(),
        "start_ms": start_ms,
        "end_ms": end_ms,
        "shards": group.spec.shard_sizes,
        "part_len": group.spec.part_len,
        "failed_aggregators": report.failed_aggregators,
        "failed_senders": report.failed_senders,
        "max_abs_err": max_abs_err,
        "offered_up": offer.up,
        "offered_down": offer.down,
        "up_est": bw.up.get(),
        "down_est": bw.down.get(),
        "sent_bytes": Transfers::total(&transfers.sent).0,
        "received_bytes": Transfers::total(&transfers.received).0,
    }))
}
