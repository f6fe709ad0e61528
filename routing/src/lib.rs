//! Nearest-neighbour search in similarity graphs: an HNSW index (L2, inner product, cosine;
//! parallel build, searches under an `ef` beam or a budget of distance computations, inserts,
//! deletes with repair, label filters, a file format), readers of the usual vector files with
//! brute-force ground truth, and the search side of learned routing ("Learning to Route in
//! Similarity Graphs": routed search, the breadth-first expert, training with burn).
//! No networking here: the daemon serves shards of an index to peers.

pub mod data;
pub mod distance;
pub mod hnsw;
pub mod learned;
pub mod store;
pub mod train;
mod visited;

pub use distance::Metric;
pub use hnsw::{Found, Hit, Hnsw, Params, Query};

/// What the routing crate reports.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid input: {0}")]
    Invalid(String),
    #[error("no vector with key {0}")]
    NotFound(u64),
    #[error("{path}: {source}")]
    Io {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {what}")]
    Corrupt {
        path: std::path::PathBuf,
        what: String,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
