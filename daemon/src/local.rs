//! Several nodes in one process on loopback: used by `colony demo`, `colony bench` and the
//! in-process tests. Each node has its own data directory and key, exactly as separate
//! processes would.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use libp2p::Multiaddr;

use crate::config::NodeConfig;
use crate::node::Node;

/// How to start the nodes of a local swarm.
#[derive(Clone, Debug)]
pub struct LocalSwarmConfig {
    pub nodes: usize,
    /// Every node's config is this one with its own data directory and bootstrap list.
    pub template: NodeConfig,
    /// How many of the first nodes each later node bootstraps from.
    pub bootstrap_from: usize,
    /// HTTP API address of the first node (the others serve none).
    pub first_http: Option<std::net::SocketAddr>,
    /// The model the first node serves (the others serve none).
    pub first_infer: Option<crate::config::InferConfig>,
}

impl Default for LocalSwarmConfig {
    fn default() -> Self {
        let mut template = NodeConfig::loopback(".");
        template.dht.announce_interval_s = 0;
        template.dht.replicate_interval_s = 0;
        Self {
            nodes: 4,
            template,
            bootstrap_from: 3,
            first_http: None,
            first_infer: None,
        }
    }
}

#[derive(Debug)]
pub struct LocalSwarm {
    pub nodes: Vec<Node>,
    root: PathBuf,
    next_index: usize,
    config: LocalSwarmConfig,
    seeds: Vec<Multiaddr>,
}

impl LocalSwarm {
    /// Starts `config.nodes` nodes with data directories under `root`.
    pub async fn start(root: &Path, config: LocalSwarmConfig) -> anyhow::Result<Self> {
        let mut swarm = Self {
            nodes: Vec::new(),
            root: root.to_owned(),
            next_index: 0,
            config: config.clone(),
            seeds: Vec::new(),
        };
        for _ in 0..config.nodes {
            let node = swarm.spawn_node().await?;
            if swarm.seeds.len() < config.bootstrap_from.max(1) {
                swarm.seeds.extend(node.dial_addrs().await?);
            }
            swarm.nodes.push(node);
        }
        Ok(swarm)
    }

    /// Starts one more node (not added to `nodes`) bootstrapping from the seeds.
    pub async fn spawn_node(&mut self) -> anyhow::Result<Node> {
        let seeds = self.seeds.clone();
        self.spawn_node_with(seeds).await
    }

    /// Starts one more node (not added to `nodes`) bootstrapping from `bootstrap`.
    pub async fn spawn_node_with(&mut self, bootstrap: Vec<Multiaddr>) -> anyhow::Result<Node> {
        let i = self.next_index;
        self.next_index += 1;
        let mut cfg = self.config.template.clone();
        cfg.data_dir = self.root.join(format!("node-{i}"));
        cfg.bootstrap = bootstrap;
        if i == 0 {
            cfg.http = self.config.first_http;
            cfg.infer = self.config.first_infer.clone();
        }
        Node::start(cfg)
            .await
            .with_context(|| format!("cannot start local node {i}"))
    }

    /// Waits until every node has at least `min_peers` peers in its routing table.
    pub async fn wait_for_routing(
        &self,
        min_peers: usize,
        timeout: Duration,
    ) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let mut all = true;
            for n in &self.nodes {
                if n.handle.status().await?.routing_table_peers < min_peers {
                    all = false;
                    break;
                }
            }
            if all {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                anyhow::bail!("nodes did not find {min_peers} peers each within {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops every node gracefully.
    pub async fn shutdown(self) {
        futures::future::join_all(self.nodes.into_iter().map(|n| n.shutdown())).await;
    }
}
