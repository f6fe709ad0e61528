//! The libp2p swarm: its behaviours, how it is built, and the actor that owns it.
//!
//! Nothing outside this module touches the `Swarm`; everything else talks to the actor
//! through a [`NodeHandle`](crate::handle::NodeHandle) (commands with a oneshot reply).

pub mod actor;
pub mod codec;
pub mod penalty;
pub mod rate;

use std::num::NonZeroUsize;
use std::time::Duration;

use anyhow::Context;
use colony_protocol::names::{IDENTIFY_PROTOCOL, KAD_PROTOCOL, MAX_GOSSIP_BYTES, MAX_RPC_BYTES};
use libp2p::swarm::NetworkBehaviour;
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::{
    StreamProtocol, Swarm, SwarmBuilder, allow_block_list, autonat, connection_limits, dcutr,
    gossipsub, identify, identity::Keypair, kad, noise, ping, relay, request_response, tcp, yamux,
};

use crate::config::{NodeConfig, Reachability};
use crate::telemetry::Traffic;
use codec::{PartCodec, RpcCodec};

pub const AGENT: &str = concat!("colony/", env!("CARGO_PKG_VERSION"));

#[allow(missing_debug_implementations)] // libp2p behaviours are not Debug
#[derive(NetworkBehaviour)]
pub struct Behaviour {
    pub blocked: allow_block_list::Behaviour<allow_block_list::BlockedPeers>,
    pub limits: connection_limits::Behaviour,
    pub kad: kad::Behaviour<kad::store::MemoryStore>,
    pub rpc: request_response::Behaviour<RpcCodec>,
    pub parts: request_response::Behaviour<PartCodec>,
    pub gossip: gossipsub::Behaviour,
    pub identify: identify::Behaviour,
    pub ping: ping::Behaviour,
    pub autonat: autonat::Behaviour,
    pub relay_server: Toggle<relay::Behaviour>,
    pub relay_client: relay::client::Behaviour,
    pub dcutr: dcutr::Behaviour,
}

/// Builds the swarm for `config` with identity `key`: QUIC and TCP+Noise+Yamux, DNS, and a
/// relay-client transport.
pub fn build(
    key: Keypair,
    config: &NodeConfig,
    traffic: &Traffic,
) -> anyhow::Result<Swarm<Behaviour>> {
    let limits = &config.limits;
    let idle = Duration::from_secs(limits.idle_connection_timeout_s);
    let swarm = SwarmBuilder::with_existing_identity(key)
        .with_tokio()
        .with_tcp(
            tcp::Config::default().nodelay(true),
            noise::Config::new,
            yamux::Config::default,
        )
        .context("cannot set up the TCP transport")?
        .with_quic()
        .with_dns()
        .context("cannot set up DNS resolution")?
        .with_relay_client(noise::Config::new, yamux::Config::default)
        .context("cannot set up the relay client transport")?
        .with_behaviour(|key, relay_client| behaviour(key, relay_client, config, traffic))
        .map_err(|e| anyhow::anyhow!("cannot build the network behaviour: {e}"))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(idle))
        .build();
    Ok(swarm)
}

fn behaviour(
    key: &Keypair,
    relay_client: relay::client::Behaviour,
    config: &NodeConfig,
    traffic: &Traffic,
) -> Result<Behaviour, Box<dyn std::error::Error + Send + Sync>> {
    let peer_id = key.public().to_peer_id();

    let mut kad_cfg = kad::Config::new(StreamProtocol::new(KAD_PROTOCOL));
    kad_cfg.set_query_timeout(config.dht.lookup_timeout());
    // Records travel over our own RPC (per-subkey merge, signatures, limits); Kademlia only
    // routes. Its own record store stays empty.
    kad_cfg
        .set_record_ttl(None)
        .set_publication_interval(None)
        .set_replication_interval(None);
    kad_cfg.set_periodic_bootstrap_interval(Some(Duration::from_secs(120)));
    kad_cfg.set_replication_factor(NonZeroUsize::new(20).expect("non-zero"));
    let mut kad =
        kad::Behaviour::with_config(peer_id, kad::store::MemoryStore::new(peer_id), kad_cfg);
    kad.set_mode(match config.reachability {
        Reachability::Public => Some(kad::Mode::Server),
        Reachability::Private => Some(kad::Mode::Client),
        Reachability::Auto => None,
    });

    // A stream that goes silent for somewhat less than the RPC timeout is seen (and
    // penalised) by the codec before libp2p would drop it silently; a large answer on a slow
    // but steady link may take longer (the codec's minimum rate), so the request as a whole
    // gets the time a largest message needs at that rate.
    let read_timeout = config.dht.rpc_timeout().mul_f32(0.8);
    let rpc = request_response::Behaviour::with_codec(
        RpcCodec::new(read_timeout, traffic.rpc.clone()),
        [(codec::PROTOCOL, request_response::ProtocolSupport::Full)],
        request_response::Config::default()
            .with_request_timeout(
                config.dht.rpc_timeout() + codec::max_transfer_time(Duration::ZERO, MAX_RPC_BYTES),
            )
            .with_max_concurrent_streams(config.limits.max_inbound_streams),
    );

    // All-reduce parts: many in flight per connection (pipelining), a generous timeout for
    // megabytes on slow links.
    let parts = request_response::Behaviour::with_codec(
        PartCodec::new(Duration::from_secs(60), traffic.allreduce.clone()),
        [(
            codec::PART_PROTOCOL,
            request_response::ProtocolSupport::Full,
        )],
        request_response::Config::default()
            .with_request_timeout(Duration::from_secs(120))
            .with_max_concurrent_streams(1024),
    );

    let gossip_cfg = gossipsub::ConfigBuilder::default()
        .max_transmit_size(MAX_GOSSIP_BYTES)
        .validation_mode(gossipsub::ValidationMode::Strict)
        .heartbeat_interval(Duration::from_secs(1))
        .build()?;
    let gossip = gossipsub::Behaviour::new(
        gossipsub::MessageAuthenticity::Signed(key.clone()),
        gossip_cfg,
    )?;

    let identify = identify::Behaviour::new(
        identify::Config::new(IDENTIFY_PROTOCOL.into(), key.public())
            .with_agent_version(AGENT.into())
            .with_push_listen_addr_updates(true),
    );

    let relay_server = match config.reachability {
        Reachability::Private => None,
        _ => Some(relay::Behaviour::new(
            peer_id,
            relay::Config {
                max_circuit_duration: Duration::from_secs(3600),
                max_circuit_bytes: 1 << 30,
                ..relay::Config::default()
            },
        )),
    };

    let limits = connection_limits::ConnectionLimits::default()
        .with_max_established(Some(config.limits.max_connections))
        .with_max_established_per_peer(Some(config.limits.max_connections_per_peer))
        .with_max_pending_incoming(Some(config.limits.max_connections / 4 + 1));

    Ok(Behaviour {
        blocked: allow_block_list::Behaviour::default(),
        limits: connection_limits::Behaviour::new(limits),
        kad,
        rpc,
        parts,
        gossip,
        identify,
        ping: ping::Behaviour::new(ping::Config::new().with_interval(Duration::from_secs(15))),
        autonat: autonat::Behaviour::new(peer_id, autonat::Config::default()),
        relay_server: relay_server.into(),
        relay_client,
        dcutr: dcutr::Behaviour::new(peer_id),
    })
}
