//! Graph-routing wire types: a node serving a shard of a nearest-neighbour index announces it
//! in the DHT under `route/<index>/shard/<i>` (a [`ShardRecord`] owned by the node's key), and
//! answers [`RouteRequest::Search`] over peer RPC with its shard's nearest vectors. A client
//! fans a query out to one replica of every shard and merges the answers.

use serde::{Deserialize, Serialize};

/// Largest query vector.
pub const MAX_ROUTE_DIM: usize = 4096;
/// Most neighbours one search may ask for.
pub const MAX_ROUTE_K: u32 = 1000;
/// Widest beam one search may ask for.
pub const MAX_ROUTE_EF: u32 = 10_000;
/// Most shards of one index.
pub const MAX_SHARDS: u32 = 1024;

/// What a node announces for each shard it serves.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardRecord {
    pub index: String,
    pub shard: u32,
    /// How many shards the index has (every shard's record says the same).
    pub shards: u32,
    /// Live vectors in this shard.
    pub vectors: u64,
    pub dim: u32,
    /// "l2", "ip" or "cosine".
    pub metric: String,
}

/// One search of one shard.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RouteSearch {
    pub index: String,
    pub shard: u32,
    pub vector: Vec<f32>,
    pub k: u32,
    pub ef: u32,
    /// A budget of distance computations.
    pub max_dcs: Option<u32>,
    /// Only vectors with this label.
    pub label: Option<u32>,
}

impl RouteSearch {
    /// Checks the limits every node applies before searching; the error names the problem.
    pub fn validate(&self) -> Result<(), String> {
        if self.vector.is_empty() || self.vector.len() > MAX_ROUTE_DIM {
            return Err(format!(
                "a query vector has 1 to {MAX_ROUTE_DIM} values, not {}",
                self.vector.len()
            ));
        }
        if let Some(i) = self.vector.iter().position(|v| !v.is_finite()) {
            return Err(format!("query value {i} is not finite"));
        }
        if self.k == 0 || self.k > MAX_ROUTE_K {
            return Err(format!("k must be 1 to {MAX_ROUTE_K}, not {}", self.k));
        }
        if self.ef > MAX_ROUTE_EF {
            return Err(format!(
                "ef must be at most {MAX_ROUTE_EF}, not {}",
                self.ef
            ));
        }
        if self.max_dcs == Some(0) {
            return Err("a budget of 0 distance computations finds nothing".into());
        }
        Ok(())
    }
}

/// One neighbour: the vector's key (its global id) and its distance to the query.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct RouteHit {
    pub key: u64,
    pub distance: f32,
}

/// Routing RPCs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum RouteRequest {
    Search(RouteSearch),
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum RouteResponse {
    /// Nearest first.
    Hits(Vec<RouteHit>),
    /// Not served here, or a bad request; the reason names it.
    Refused(String),
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn search() -> RouteSearch {
        RouteSearch {
            index: "glove".into(),
            shard: 0,
            vector: vec![0.5; 50],
            k: 10,
            ef: 64,
            max_dcs: None,
            label: None,
        }
    }

    #[test]
    fn limits_are_checked_and_named() {
        assert!(search().validate().is_ok());
        let cases: Vec<(RouteSearch, &str)> = vec![
            (
                RouteSearch {
                    vector: vec![],
                    ..search()
                },
                "values",
            ),
            (
                RouteSearch {
                    vector: vec![0.0; MAX_ROUTE_DIM + 1],
                    ..search()
                },
                "values",
            ),
            (
                RouteSearch {
                    vector: vec![f32::NAN; 4],
                    ..search()
                },
                "not finite",
            ),
            (RouteSearch { k: 0, ..search() }, "k must"),
            (
                RouteSearch {
                    k: MAX_ROUTE_K + 1,
                    ..search()
                },
                "k must",
            ),
            (
                RouteSearch {
                    ef: MAX_ROUTE_EF + 1,
                    ..search()
                },
                "ef must",
            ),
            (
                RouteSearch {
                    max_dcs: Some(0),
                    ..search()
                },
                "budget",
            ),
        ];
        for (s, want) in cases {
            let e = s.validate().unwrap_err();
            assert!(e.contains(want), "{e:?} should mention {want:?}");
        }
    }

    #[test]
    fn requests_and_records_round_trip() {
        let r = crate::Request::Route(RouteRequest::Search(search()));
        assert_eq!(
            crate::Request::from_bytes(&r.to_bytes().unwrap()).unwrap(),
            r
        );
        let a = crate::Response::Route(RouteResponse::Hits(vec![RouteHit {
            key: 7,
            distance: 0.25,
        }]));
        assert_eq!(
            crate::Response::from_bytes(&a.to_bytes().unwrap()).unwrap(),
            a
        );
        let rec = ShardRecord {
            index: "glove".into(),
            shard: 1,
            shards: 2,
            vectors: 195_000,
            dim: 50,
            metric: "l2".into(),
        };
        let b = crate::encode(&rec, crate::names::MAX_VALUE_BYTES).unwrap();
        assert_eq!(
            crate::decode::<ShardRecord>(&b, crate::names::MAX_VALUE_BYTES).unwrap(),
            rec
        );
    }
}
