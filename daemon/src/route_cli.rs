//! `colony route`: build an HNSW index (or one shard of it) from a vector file, train learned
//! routing vectors for it, and query it: a file on this machine, or an index served in shards
//! by the swarm (through a running node's HTTP API; serving shards is the node's job, see
//! `route_service`).

use std::path::PathBuf;
use std::time::Instant;

use clap::{Args, Subcommand};
use colony_routing::data::read_vectors;
use colony_routing::{Hnsw, Metric, Params, Query};

#[derive(Debug, Subcommand)]
pub enum RouteCommand {
    /// Build an index from a vector file (.npy, .fvecs, .bvecs); keys are row numbers.
    Build(BuildArgs),
    /// Learn routing vectors for an index (imitation of a breadth-first expert, burn on CPU).
    Train(TrainArgs),
    /// The nearest neighbours of one vector or of every row of a file.
    Query(QueryArgs),
}

#[derive(Debug, Args)]
pub struct BuildArgs {
    /// The vectors.
    #[arg(long)]
    pub data: PathBuf,
    /// Where the index is written.
    #[arg(long)]
    pub out: PathBuf,
    /// l2, ip or cosine.
    #[arg(long, default_value = "l2")]
    pub metric: String,
    #[arg(long, default_value_t = 16)]
    pub m: usize,
    #[arg(long, default_value_t = 200)]
    pub ef_construction: usize,
    /// Index only the first N rows (0: all).
    #[arg(long, default_value_t = 0)]
    pub limit: usize,
    /// Build shard I of --shards (contiguous row ranges; keys stay the global row numbers).
    #[arg(long, default_value_t = 0)]
    pub shard: u32,
    #[arg(long, default_value_t = 1)]
    pub shards: u32,
}

#[derive(Debug, Args)]
pub struct TrainArgs {
    /// An index written by `colony route build`.
    #[arg(long)]
    pub index: PathBuf,
    /// Where the routing vectors are written.
    #[arg(long)]
    pub out: PathBuf,
    /// Dimension of the routing subspace (0: the vectors' own).
    #[arg(long, default_value_t = 16)]
    pub dim: usize,
    /// Budgets of distance computations to train for.
    #[arg(long, value_delimiter = ',', default_value = "128")]
    pub budgets: Vec<usize>,
    /// Vertices re-ranked on the original vectors, as a fraction of the budget.
    #[arg(long, default_value_t = 0.125)]
    pub verify: f64,
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    #[arg(long, default_value_t = 4000)]
    pub queries: usize,
    #[arg(long, default_value_t = 500)]
    pub steps: usize,
    #[arg(long, default_value_t = 3e-4)]
    pub lr: f64,
    /// Stored vectors held out as dev queries (the best round on them is kept).
    #[arg(long, default_value_t = 1000)]
    pub dev: usize,
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
}

#[derive(Debug, Args)]
pub struct QueryArgs {
    /// An index written by `colony route build`.
    #[arg(long, required_unless_present = "swarm", conflicts_with = "swarm")]
    pub index: Option<PathBuf>,
    /// An index served in shards by the swarm, by name: asked through the node at --api.
    #[arg(long)]
    pub swarm: Option<String>,
    /// The node's HTTP API (with --swarm).
    #[arg(long, env = "COLONY_API", default_value = "http://127.0.0.1:8700")]
    pub api: String,
    /// Routing vectors from `colony route train` (needs --max-dcs): the learned-routing search.
    #[arg(long, requires = "max_dcs", conflicts_with = "swarm")]
    pub routing: Option<PathBuf>,
    /// One query vector, comma-separated.
    #[arg(long, conflicts_with = "queries", allow_hyphen_values = true)]
    pub vector: Option<String>,
    /// A file of query vectors (one answer line per row).
    #[arg(long)]
    pub queries: Option<PathBuf>,
    #[arg(long, default_value_t = 10)]
    pub k: usize,
    #[arg(long, default_value_t = 64)]
    pub ef: usize,
    /// A budget of distance computations per query.
    #[arg(long)]
    pub max_dcs: Option<usize>,
    /// Only vectors with this label.
    #[arg(long)]
    pub label: Option<u32>,
    /// Print JSON lines instead of text.
    #[arg(long)]
    pub json: bool,
}

pub fn run(cmd: RouteCommand) -> anyhow::Result<()> {
    match cmd {
        RouteCommand::Build(a) => build(a),
        RouteCommand::Train(a) => train(a),
        RouteCommand::Query(a) if a.swarm.is_some() => query_swarm(a),
        RouteCommand::Query(a) => query(a),
    }
}

pub fn build(a: BuildArgs) -> anyhow::Result<()> {
    let metric = Metric::parse(&a.metric).map_err(anyhow::Error::msg)?;
    let mut v = read_vectors(&a.data)?;
    if a.limit > 0 && a.limit < v.n {
        v = v.rows(0..a.limit);
    }
    anyhow::ensure!(
        a.shards >= 1 && a.shard < a.shards,
        "--shard {} of --shards {}: shards are numbered from 0",
        a.shard,
        a.shards
    );
    let rows = crate::route_service::shard_rows(v.n, a.shard, a.shards);
    let params = Params {
        ef_construction: a.ef_construction,
        ..Params::with_m(a.m)
    };
    let t = Instant::now();
    let part = if a.shards == 1 {
        v
    } else {
        v.rows(rows.clone())
    };
    let keys: Vec<u64> = rows.map(|r| r as u64).collect();
    let mut index = Hnsw::new(part.dim, metric, params)?;
    // In chunks (each inserted in parallel) so that a bar can show the progress; the bar is
    // drawn only on a terminal.
    let bar = crate::cli::progress_bar(keys.len() as u64, "vectors indexed");
    let chunk = (keys.len() / 100).clamp(1000, 50_000);
    for (i, ks) in keys.chunks(chunk).enumerate() {
        let start = i * chunk * part.dim;
        index.insert_many(&part.data[start..start + ks.len() * part.dim], ks, None)?;
        bar.inc(ks.len() as u64);
    }
    bar.finish_and_clear();
    let secs = t.elapsed().as_secs_f64();
    index.save(&a.out)?;
    println!(
        "{} vectors of dimension {} ({}) indexed in {secs:.1} s on {} threads; {:.1} MB in memory; \
         written to {}",
        index.len(),
        index.dim(),
        metric.name(),
        rayon::current_num_threads(),
        index.memory_bytes() as f64 / 1e6,
        a.out.display()
    );
    Ok(())
}

/// The query vectors of --vector or --queries.
fn query_vectors(a: &QueryArgs) -> anyhow::Result<Vec<Vec<f32>>> {
    Ok(match (&a.vector, &a.queries) {
        (Some(s), None) => vec![
            s.split(',')
                .map(|x| {
                    x.trim()
                        .parse::<f32>()
                        .map_err(|e| anyhow::anyhow!("--vector: {x:?}: {e}"))
                })
                .collect::<anyhow::Result<_>>()?,
        ],
        (None, Some(p)) => {
            let m = read_vectors(p)?;
            (0..m.n).map(|i| m.row(i).to_vec()).collect()
        }
        _ => anyhow::bail!("give --vector or --queries"),
    })
}

fn train(a: TrainArgs) -> anyhow::Result<()> {
    use colony_routing::train::{TrainConfig, train};
    let index = Hnsw::load(&a.index)?;
    let cfg = TrainConfig {
        dim: a.dim,
        budgets: a.budgets.clone(),
        verify: a.verify,
        rounds: a.rounds,
        queries_per_round: a.queries,
        steps_per_round: a.steps,
        lr: a.lr,
        dev: a.dev.min(index.len() / 10),
        seed: a.seed,
        ..TrainConfig::default()
    };
    eprintln!(
        "{}: {} vectors; routing in {} dimensions for budgets {:?}, {} rounds",
        a.index.display(),
        index.len(),
        if a.dim == 0 { index.dim() } else { a.dim },
        a.budgets,
        a.rounds
    );
    let bar = crate::cli::progress_bar(a.rounds as u64 + 1, "rounds");
    let trained = train(&index, &cfg, |r| {
        let dev: Vec<String> = r
            .dev
            .iter()
            .map(|p| {
                format!(
                    "DCS {}: plain {:.3} learned {:.3}",
                    p.budget, p.plain, p.learned
                )
            })
            .collect();
        bar.suspend(|| {
            eprintln!(
                "round {}: {} events, loss {:.3}, accuracy {:.3}; dev recall@1 {}  [{:.0} s]",
                r.round,
                r.events,
                r.loss,
                r.accuracy,
                dev.join(", "),
                r.secs
            )
        });
        bar.inc(1);
    })?;
    bar.finish_and_clear();
    eprintln!("kept round {} (best on the dev queries)", trained.round);
    trained.routing.save(&index, &a.out)?;
    println!("routing vectors written to {}", a.out.display());
    Ok(())
}

/// Asks a running node to fan each query out to the shards of a swarm index.
fn query_swarm(a: QueryArgs) -> anyhow::Result<()> {
    let name = a.swarm.clone().unwrap_or_default();
    let queries = query_vectors(&a)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let client = reqwest::Client::new();
    let url = format!("{}/api/route/query", a.api.trim_end_matches('/'));
    for (i, v) in queries.into_iter().enumerate() {
        let body = crate::route_service::RouteQuery {
            index: name.clone(),
            vector: v,
            k: a.k as u32,
            ef: a.ef as u32,
            max_dcs: a.max_dcs.map(|x| x as u32),
            label: a.label,
        };
        let resp = rt.block_on(async {
            let r = client
                .post(&url)
                .json(&body)
                .send()
                .await
                .map_err(|e| anyhow::anyhow!("cannot reach the node at {}: {e}", a.api))?;
            let status = r.status();
            let text = r.text().await?;
            if !status.is_success() {
                let msg = serde_json::from_str::<serde_json::Value>(&text)
                    .ok()
                    .and_then(|v| v["error"].as_str().map(String::from))
                    .unwrap_or(text);
                anyhow::bail!("{status}: {msg}");
            }
            Ok(serde_json::from_str::<crate::route_service::Merged>(&text)?)
        })?;
        if a.json {
            println!(
                "{}",
                serde_json::json!({"query": i, "hits": resp.hits, "shards": resp.shards})
            );
        } else {
            let hits: Vec<String> = resp
                .hits
                .iter()
                .map(|h| format!("{} ({:.4})", h.key, h.distance))
                .collect();
            let from: Vec<String> = resp
                .shards
                .iter()
                .map(|s| format!("{}@{} {:.1} ms", s.shard, short_peer(&s.peer), s.ms))
                .collect();
            println!(
                "query {i}: {}  [shards {}]",
                hits.join(", "),
                from.join(", ")
            );
        }
    }
    Ok(())
}

fn short_peer(p: &str) -> &str {
    &p[p.len().saturating_sub(6)..]
}

fn query(a: QueryArgs) -> anyhow::Result<()> {
    let t = Instant::now();
    let path = a
        .index
        .clone()
        .ok_or_else(|| anyhow::anyhow!("give --index or --swarm"))?;
    let index = Hnsw::load(&path)?;
    let routing = match &a.routing {
        Some(p) => Some(colony_routing::learned::Routing::load(&index, p)?),
        None => None,
    };
    let load_ms = t.elapsed().as_secs_f64() * 1e3;
    let q = Query {
        k: a.k,
        ef: a.ef,
        max_dcs: a.max_dcs,
        label: a.label,
        bottom_only: false,
    };
    let queries = query_vectors(&a)?;
    if !a.json {
        eprintln!(
            "{}: {} vectors of dimension {} ({}), loaded in {load_ms:.0} ms",
            path.display(),
            index.len(),
            index.dim(),
            index.metric().name()
        );
    }
    for (i, v) in queries.iter().enumerate() {
        let f = match (&routing, a.max_dcs) {
            (Some(r), Some(b)) => index.search_routed(
                r,
                v,
                &colony_routing::learned::Routed {
                    k: a.k,
                    max_dcs: b,
                    verify: colony_routing::train::verify_for(b, 0.125).max(a.k),
                },
            )?,
            _ => index.search(v, &q)?,
        };
        if a.json {
            let hits: Vec<serde_json::Value> = f
                .hits
                .iter()
                .map(|h| serde_json::json!({"key": h.key, "distance": h.distance}))
                .collect();
            println!(
                "{}",
                serde_json::json!({"query": i, "hits": hits, "dcs": f.dcs, "hops": f.hops})
            );
        } else {
            let hits: Vec<String> = f
                .hits
                .iter()
                .map(|h| format!("{} ({:.4})", h.key, h.distance))
                .collect();
            println!("query {i}: {}  [{} distances]", hits.join(", "), f.dcs);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use colony_routing::data::{Matrix, write_npy};

    #[test]
    fn build_then_query_a_file_and_bad_input_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("v.npy");
        let m = Matrix {
            n: 300,
            dim: 4,
            data: (0..1200).map(|i| ((i * 37) % 101) as f32).collect(),
        };
        write_npy(&data, &m).unwrap();
        let out = dir.path().join("v.hnsw");
        build(BuildArgs {
            data: data.clone(),
            out: out.clone(),
            metric: "l2".into(),
            m: 8,
            ef_construction: 50,
            limit: 0,
            shard: 0,
            shards: 1,
        })
        .unwrap();
        let index = Hnsw::load(&out).unwrap();
        assert_eq!(index.len(), 300);
        // Row 5 is its own nearest neighbour.
        let f = index.search(m.row(5), &Query::top(1, 32)).unwrap();
        assert_eq!(f.hits[0].distance, 0.0);
        let q = |vector: Option<&str>| QueryArgs {
            index: Some(out.clone()),
            swarm: None,
            api: String::new(),
            routing: None,
            vector: vector.map(String::from),
            queries: None,
            k: 3,
            ef: 16,
            max_dcs: None,
            label: None,
            json: true,
        };
        query(q(Some("1,2,3,4"))).unwrap();
        // Learned routing: train, write, query with it.
        let routing = dir.path().join("v.route");
        train(TrainArgs {
            index: out.clone(),
            out: routing.clone(),
            dim: 2,
            budgets: vec![48],
            verify: 0.125,
            rounds: 1,
            queries: 50,
            steps: 5,
            lr: 3e-4,
            dev: 30,
            seed: 1,
        })
        .unwrap();
        query(QueryArgs {
            routing: Some(routing.clone()),
            max_dcs: Some(48),
            ..q(Some("1,2,3,4"))
        })
        .unwrap();
        let e = query(q(Some("1,2,x,4"))).unwrap_err().to_string();
        assert!(e.contains("\"x\""), "{e}");
        let e = query(q(Some("1,2"))).unwrap_err().to_string();
        assert!(e.contains("dimension"), "{e}");
        assert!(query(q(None)).is_err());
        let e = build(BuildArgs {
            data,
            out,
            metric: "hamming".into(),
            m: 8,
            ef_construction: 50,
            limit: 0,
            shard: 0,
            shards: 1,
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("hamming"), "{e}");
    }
}
