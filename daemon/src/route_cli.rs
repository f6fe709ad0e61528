//! `colony route`: build an HNSW index from a vector file and query it on this machine.
//! (Serving an index's shards to peers is the node's job.)

use std::path::PathBuf;
use std::time::Instant;

use clap::{Args, Subcommand};
use colony_routing::data::read_vectors;
use colony_routing::{Hnsw, Metric, Params, Query};

#[derive(Debug, Subcommand)]
pub enum RouteCommand {
    /// Build an index from a vector file (.npy, .fvecs, .bvecs); keys are row numbers.
    Build(BuildArgs),
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
}

#[derive(Debug, Args)]
pub struct QueryArgs {
    /// An index written by `colony route build`.
    #[arg(long)]
    pub index: PathBuf,
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
        RouteCommand::Query(a) => query(a),
    }
}

fn build(a: BuildArgs) -> anyhow::Result<()> {
    let metric = Metric::parse(&a.metric).map_err(anyhow::Error::msg)?;
    let mut v = read_vectors(&a.data)?;
    if a.limit > 0 && a.limit < v.n {
        v = v.rows(0..a.limit);
    }
    let params = Params {
        ef_construction: a.ef_construction,
        ..Params::with_m(a.m)
    };
    let t = Instant::now();
    let index = Hnsw::build(&v.data, v.dim, metric, params)?;
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

fn query(a: QueryArgs) -> anyhow::Result<()> {
    let t = Instant::now();
    let index = Hnsw::load(&a.index)?;
    let load_ms = t.elapsed().as_secs_f64() * 1e3;
    let q = Query {
        k: a.k,
        ef: a.ef,
        max_dcs: a.max_dcs,
        label: a.label,
        bottom_only: false,
    };
    let queries: Vec<Vec<f32>> = match (&a.vector, &a.queries) {
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
    };
    if !a.json {
        eprintln!(
            "{}: {} vectors of dimension {} ({}), loaded in {load_ms:.0} ms",
            a.index.display(),
            index.len(),
            index.dim(),
            index.metric().name()
        );
    }
    for (i, v) in queries.iter().enumerate() {
        let f = index.search(v, &q)?;
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
        })
        .unwrap();
        let index = Hnsw::load(&out).unwrap();
        assert_eq!(index.len(), 300);
        // Row 5 is its own nearest neighbour.
        let f = index.search(m.row(5), &Query::top(1, 32)).unwrap();
        assert_eq!(f.hits[0].distance, 0.0);
        let q = |vector: Option<&str>| QueryArgs {
            index: out.clone(),
            vector: vector.map(String::from),
            queries: None,
            k: 3,
            ef: 16,
            max_dcs: None,
            label: None,
            json: true,
        };
        query(q(Some("1,2,3,4"))).unwrap();
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
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("hamming"), "{e}");
    }
}
