//! Prometheus metrics (`GET /metrics`, text format 0.0.4), read from the node's state at each
//! scrape: the swarm (peers, routing table, DHT store, offences, bans, round-trip times), and
//! each service the node runs (inference jobs by state, routing shards, the patch chain).

use std::fmt::Write;

use crate::infer_service::{InferService, JobState};
use crate::patch_service::PatchService;
use crate::route_service::RouteService;
use crate::swarm::actor::{NodeStatus, PeerSummary};
use crate::telemetry::Telemetry;

/// Builds the exposition text. One `# HELP` and `# TYPE` per metric family.
#[derive(Debug, Default)]
pub struct Exposition {
    out: String,
}

impl Exposition {
    /// Starts a family.
    pub fn family(&mut self, name: &str, kind: &str, help: &str) -> &mut Self {
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
        self
    }

    /// One sample of the current family.
    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) -> &mut Self {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let v = v
                    .replace('\\', "\\\\")
                    .replace('"', "\\\"")
                    .replace('\n', "\\n");
                let _ = write!(self.out, "{k}=\"{v}\"");
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {}", fmt_value(value));
        self
    }

    /// A family with one unlabelled sample.
    pub fn single(&mut self, name: &str, kind: &str, help: &str, value: f64) -> &mut Self {
        self.family(name, kind, help).sample(name, &[], value)
    }

    pub fn finish(self) -> String {
        self.out
    }
}

fn fmt_value(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 {
            "+Inf".into()
        } else {
            "-Inf".into()
        }
    } else {
        format!("{v}")
    }
}

/// The node's metrics.
pub fn render(
    status: &NodeStatus,
    peers: &[PeerSummary],
    infer: Option<&InferService>,
    route: Option<&RouteService>,
    patch: Option<&PatchService>,
    telemetry: &Telemetry,
) -> String {
    let mut e = Exposition::default();
    e.single("colony_up", "gauge", "1 while the node runs.", 1.0);
    e.single(
        "colony_uptime_seconds",
        "counter",
        "Seconds since the node started.",
        status.uptime_s as f64,
    );
    e.single(
        "colony_connected_peers",
        "gauge",
        "Peers with an open connection.",
        status.connected_peers as f64,
    );
    e.single(
        "colony_routing_table_peers",
        "gauge",
        "Peers in the Kademlia routing table.",
        status.routing_table_peers as f64,
    );
    e.single(
        "colony_dht_entries",
        "gauge",
        "DHT entries this node holds.",
        status.dht_entries as f64,
    );
    e.single(
        "colony_dht_bytes",
        "gauge",
        "Bytes of DHT values this node holds.",
        status.dht_bytes as f64,
    );
    e.single(
        "colony_offences_total",
        "counter",
        "Misbehaviour reports against peers (forged, malformed or refused messages).",
        status.offences as f64,
    );
    e.single(
        "colony_banned_peers",
        "gauge",
        "Peers banned now.",
        status.banned_peers.len() as f64,
    );
    e.family(
        "colony_peer_rtt_seconds",
        "gauge",
        "Last measured round-trip time to a connected peer.",
    );
    for p in peers {
        if let Some(ms) = p.rtt_ms {
            e.sample(
                "colony_peer_rtt_seconds",
                &[("peer", &p.peer_id)],
                ms / 1000.0,
            );
        }
    }
    telemetry_metrics(&mut e, telemetry);
    if let Some(svc) = infer {
        e.family(
            "colony_infer_jobs",
            "gauge",
            "Inference jobs this node knows, by state.",
        );
        let jobs = svc.list();
        for (state, name) in [
            (JobState::Queued, "queued"),
            (JobState::Running, "running"),
            (JobState::Done, "done"),
            (JobState::Cancelled, "cancelled"),
            (JobState::Failed, "failed"),
        ] {
            let n = jobs.iter().filter(|j| j.state == state).count();
            e.sample("colony_infer_jobs", &[("state", name)], n as f64);
        }
        e.single(
            "colony_infer_tokens_total",
            "counter",
            "Tokens written by this node's inference jobs (all Hogwild workers).",
            svc.tokens_total() as f64,
        );
        e.single(
            "colony_infer_tokens_per_second",
            "gauge",
            "Decoding rate of the running jobs, tokens/s (all workers).",
            jobs.iter()
                .filter(|j| j.state == JobState::Running)
                .map(|j| j.tokens_per_sec)
                .sum(),
        );
        e.single(
            "colony_infer_queue_limit",
            "gauge",
            "Jobs that may wait behind the running one.",
            svc.limits().queue as f64,
        );
    }
    if let Some(svc) = route {
        e.family(
            "colony_route_shard_vectors",
            "gauge",
            "Vectors in each index shard this node serves.",
        );
        for r in svc.records() {
            let shard = r.shard.to_string();
            e.sample(
                "colony_route_shard_vectors",
                &[("index", &r.index), ("shard", &shard)],
                r.vectors as f64,
            );
        }
    }
    if let Some(svc) = patch {
        let l = svc.list();
        e.single(
            "colony_patch_chain_length",
            "gauge",
            "Patches applied in this node's chain.",
            l.len as f64,
        );
        e.single(
            "colony_patch_control_error",
            "gauge",
            "Control-set error of the patched model (0-1).",
            f64::from(l.control_error),
        );
        e.family(
            "colony_patch_proposals",
            "gauge",
            "Patch proposals this node knows, by status.",
        );
        for status in ["pending", "accepted", "rejected"] {
            let n = l
                .proposals
                .iter()
                .filter(|p| p.status.starts_with(status))
                .count();
            e.sample("colony_patch_proposals", &[("status", status)], n as f64);
        }
    }
    e.finish()
}

/// Traffic by protocol, training runs, all-reduce rounds and errors by kind.
fn telemetry_metrics(e: &mut Exposition, t: &Telemetry) {
    let traffic = t.traffic.view();
    for (name, help, pick) in [
        (
            "colony_bytes_received_total",
            "Payload bytes received, by protocol (Kademlia routing, identify and ping not counted).",
            (|v: &crate::telemetry::TrafficView| v.bytes_in) as fn(&_) -> u64,
        ),
        (
            "colony_bytes_sent_total",
            "Payload bytes sent, by protocol (Kademlia routing, identify and ping not counted).",
            |v| v.bytes_out,
        ),
        (
            "colony_messages_received_total",
            "Messages received, by protocol.",
            |v| v.messages_in,
        ),
        (
            "colony_messages_sent_total",
            "Messages sent, by protocol.",
            |v| v.messages_out,
        ),
    ] {
        e.family(name, "counter", help);
        for v in &traffic {
            e.sample(name, &[("protocol", v.protocol)], pick(v) as f64);
        }
    }
    let runs = t.runs(Some(1));
    for (name, help) in [
        ("colony_train_epoch", "This node's global step in the run."),
        (
            "colony_train_loss",
            "Mean loss of this node's micro-batches at its last step.",
        ),
        (
            "colony_train_samples_per_second",
            "This node's training throughput at its last step.",
        ),
        (
            "colony_train_swarm_samples",
            "Samples the swarm reported at its current epoch (towards the target batch).",
        ),
        ("colony_train_target_batch", "Samples per global step."),
    ] {
        e.family(name, "gauge", help);
        for r in &runs {
            let last = r.history.last();
            let v = match name {
                "colony_train_epoch" => r.epoch as f64,
                "colony_train_loss" => last.and_then(|p| p.loss).map_or(f64::NAN, f64::from),
                "colony_train_samples_per_second" => last.map_or(0.0, |p| p.samples_per_sec),
                "colony_train_swarm_samples" => r.swarm.as_ref().map_or(0.0, |s| s.samples as f64),
                _ => r.target_batch as f64,
            };
            e.sample(name, &[("run", &r.run)], v);
        }
    }
    let bw = t.bandwidth();
    e.family(
        "colony_bandwidth_bytes_per_second",
        "gauge",
        "This node's measured bandwidth (probes and all-reduce rounds), by direction.",
    );
    for (dir, v) in [("up", bw.up_bps), ("down", bw.down_bps)] {
        if let Some(v) = v {
            e.sample(
                "colony_bandwidth_bytes_per_second",
                &[("direction", dir)],
                v,
            );
        }
    }
    let rounds = t.rounds(usize::MAX);
    e.single(
        "colony_allreduce_rounds",
        "gauge",
        "All-reduce rounds in the node's recent record (at most 200).",
        rounds.len() as f64,
    );
    if let Some(r) = rounds.last() {
        e.single(
            "colony_allreduce_last_round_seconds",
            "gauge",
            "Duration of the last all-reduce round this node took part in.",
            r.seconds,
        );
        e.single(
            "colony_allreduce_last_round_bound_seconds",
            "gauge",
            "The leader's predicted duration of that round at the declared bandwidths (its bound).",
            r.bound_s,
        );
    }
    e.family(
        "colony_errors_total",
        "counter",
        "Errors by kind (failed rounds, skipped steps, failed RPCs, refused jobs).",
    );
    for (kind, n) in t.errors() {
        e.sample("colony_errors_total", &[("kind", &kind)], n as f64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_escapes_labels_and_writes_special_values() {
        let mut e = Exposition::default();
        e.family("x", "gauge", "help");
        e.sample("x", &[("a", "q\"uo\\te\nnl")], f64::NAN);
        e.sample("x", &[], f64::INFINITY);
        let s = e.finish();
        assert!(s.contains("x{a=\"q\\\"uo\\\\te\\nnl\"} NaN"), "{s}");
        assert!(s.contains("x +Inf"));
        assert!(s.starts_with("# HELP x help\n# TYPE x gauge\n"));
    }
}
