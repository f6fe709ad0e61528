//! The node's configuration: one TOML file, every field optional with a sane default.
//! The CLI layers flags and `COLONY_*` environment variables on top.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use libp2p::Multiaddr;
use serde::{Deserialize, Serialize};

/// Whether this node accepts inbound connections.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Reachability {
    /// Decide from AutoNAT and confirmed external addresses.
    #[default]
    Auto,
    /// Known reachable: Kademlia server mode, relay server on.
    Public,
    /// Behind NAT or a firewall: Kademlia client mode, reachable only through relays.
    Private,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NodeConfig {
    /// Where the node key, snapshots and state live.
    pub data_dir: PathBuf,
    /// Multiaddrs to listen on (TCP and QUIC).
    pub listen: Vec<Multiaddr>,
    /// Peers to join through, with their `/p2p/<peer id>` suffix.
    pub bootstrap: Vec<Multiaddr>,
    /// HTTP API and dashboard address; `None` disables it.
    pub http: Option<SocketAddr>,
    /// The bearer token of the API's requests that change state (every method but GET and
    /// HEAD). Unset: a random one kept in `<data_dir>/api-token`, which the CLI reads.
    pub api_token: Option<String>,
    pub reachability: Reachability,
    /// Relays to listen through when private (default: the bootstrap peers).
    pub relays: Vec<Multiaddr>,
    /// Services this node offers to the swarm.
    pub services: Vec<String>,
    pub dht: DhtConfig,
    pub limits: LimitsConfig,
    /// Serve inference jobs (peer RPC and `/v1/chat/completions`) with this model.
    pub infer: Option<InferConfig>,
    /// Serve these shards of nearest-neighbour indexes (`[[route]]` tables).
    pub route: Vec<crate::route_service::ShardConfig>,
    /// Compute, verify and adopt patches of an editable model (`[patch]`).
    pub patch: Option<crate::patch_service::PatchConfig>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InferConfig {
    /// A GGUF file or a Hugging Face folder.
    pub model: PathBuf,
    /// Jobs waiting behind the running one.
    #[serde(default = "default_infer_queue")]
    pub queue: usize,
    /// Tokens per worker a job may ask for.
    #[serde(default = "default_infer_max_tokens")]
    pub max_tokens: u32,
}

fn default_infer_queue() -> usize {
    8
}

fn default_infer_max_tokens() -> u32 {
    2048
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DhtConfig {
    /// How many of the closest nodes store each entry.
    pub replicas: usize,
    /// How many of the closest nodes a get asks.
    pub get_fanout: usize,
    /// How many closest nodes a lookup must confirm before a store or get picks its targets
    /// (Kademlia's k). Smaller is faster but, while routing tables are still filling, lets a
    /// store and a later get settle on different "closest" sets.
    pub lookup_size: usize,
    /// Timeout of one RPC, milliseconds.
    pub rpc_timeout_ms: u64,
    /// Timeout of a closest-peers lookup, milliseconds.
    pub lookup_timeout_ms: u64,
    /// Period of pushing held entries to the current closest nodes, seconds (0 = off).
    pub replicate_interval_s: u64,
    /// Period of announcing this node's info record, seconds (0 = off).
    pub announce_interval_s: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    pub max_connections: u32,
    pub max_connections_per_peer: u32,
    /// Concurrent inbound RPC streams per connection.
    pub max_inbound_streams: usize,
    /// Entries this node will hold for others.
    pub dht_max_keys: usize,
    pub dht_max_bytes: usize,
    pub idle_connection_timeout_s: u64,
    /// Inbound RPC requests a peer may make per second (bandwidth probes and state chunks not
    /// counted), and in a burst; more are refused as overloaded.
    pub rpc_per_peer_per_s: f64,
    pub rpc_burst_per_peer: f64,
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from(".colony"),
            listen: vec![
                "/ip4/0.0.0.0/tcp/4001".parse().expect("static multiaddr"),
                "/ip4/0.0.0.0/udp/4001/quic-v1"
                    .parse()
                    .expect("static multiaddr"),
            ],
            bootstrap: Vec::new(),
            http: Some(SocketAddr::from(([127, 0, 0, 1], 8700))),
            api_token: None,
            reachability: Reachability::Auto,
            relays: Vec::new(),
            services: vec!["dht".into()],
            dht: DhtConfig::default(),
            limits: LimitsConfig::default(),
            infer: None,
            route: Vec::new(),
            patch: None,
        }
    }
}

impl Default for DhtConfig {
    fn default() -> Self {
        Self {
            replicas: 5,
            get_fanout: 10,
            lookup_size: 20,
            rpc_timeout_ms: 5_000,
            lookup_timeout_ms: 10_000,
            replicate_interval_s: 60,
            announce_interval_s: 30,
        }
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_connections: 512,
            max_connections_per_peer: 4,
            max_inbound_streams: 64,
            dht_max_keys: 100_000,
            dht_max_bytes: 256 * 1024 * 1024,
            idle_connection_timeout_s: 60,
            rpc_per_peer_per_s: 500.0,
            rpc_burst_per_peer: 2000.0,
        }
    }
}

impl DhtConfig {
    pub fn rpc_timeout(&self) -> Duration {
        Duration::from_millis(self.rpc_timeout_ms)
    }
    pub fn lookup_timeout(&self) -> Duration {
        Duration::from_millis(self.lookup_timeout_ms)
    }
}

impl NodeConfig {
    /// Reads a config file; the error names the file and what is wrong with it.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config file {}", path.display()))?;
        let cfg: Self = toml::from_str(&text)
            .with_context(|| format!("config file {} is invalid", path.display()))?;
        cfg.validate()
            .with_context(|| format!("config file {} is invalid", path.display()))?;
        Ok(cfg)
    }

    /// Checks values that parse but make no sense.
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(self.dht.replicas >= 1, "dht.replicas must be at least 1");
        anyhow::ensure!(
            self.dht.get_fanout >= 1,
            "dht.get_fanout must be at least 1"
        );
        anyhow::ensure!(
            self.dht.rpc_timeout_ms >= 10,
            "dht.rpc_timeout_ms must be at least 10"
        );
        anyhow::ensure!(
            self.limits.max_inbound_streams >= 1,
            "limits.max_inbound_streams must be at least 1"
        );
        anyhow::ensure!(
            self.limits.rpc_per_peer_per_s.is_finite()
                && self.limits.rpc_per_peer_per_s > 0.0
                && self.limits.rpc_burst_per_peer.is_finite()
                && self.limits.rpc_burst_per_peer >= 1.0,
            "limits.rpc_per_peer_per_s must be positive and limits.rpc_burst_per_peer at least 1"
        );
        for b in &self.bootstrap {
            anyhow::ensure!(
                b.iter()
                    .any(|p| matches!(p, libp2p::multiaddr::Protocol::P2p(_))),
                "bootstrap address {b} lacks a /p2p/<peer id> suffix"
            );
        }
        Ok(())
    }

    /// A config for tests and the demo: loopback TCP on an OS-chosen port, no HTTP.
    pub fn loopback(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: data_dir.into(),
            listen: vec!["/ip4/127.0.0.1/tcp/0".parse().expect("static multiaddr")],
            http: None,
            reachability: Reachability::Public,
            ..Self::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_partial_file_and_names_errors() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("node.toml");
        std::fs::write(&p, "reachability = \"public\"\n[dht]\nreplicas = 3\n").unwrap();
        let c = NodeConfig::load(&p).unwrap();
        assert_eq!(c.reachability, Reachability::Public);
        assert_eq!(c.dht.replicas, 3);
        assert_eq!(c.dht.get_fanout, 10);

        std::fs::write(&p, "replicas = 3\n").unwrap();
        let err = format!("{:#}", NodeConfig::load(&p).unwrap_err());
        assert!(
            err.contains("node.toml") && err.contains("unknown field"),
            "{err}"
        );

        std::fs::write(&p, "listen = [\"not an addr\"]\n").unwrap();
        let err = format!("{:#}", NodeConfig::load(&p).unwrap_err());
        assert!(err.contains("node.toml"), "{err}");

        std::fs::write(&p, "bootstrap = [\"/ip4/1.2.3.4/tcp/1\"]\n").unwrap();
        let err = format!("{:#}", NodeConfig::load(&p).unwrap_err());
        assert!(err.contains("/p2p/"), "{err}");
    }

    #[test]
    fn example_file_parses_and_shows_the_defaults() {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/node.example.toml");
        let c = NodeConfig::load(&p).unwrap();
        assert_eq!(
            serde_json::to_value(&c).unwrap(),
            serde_json::to_value(NodeConfig::default()).unwrap(),
            "deploy/node.example.toml must list the defaults"
        );
    }
}
