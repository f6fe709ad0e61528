//! Turning the declarations peers published for a round into groups and round plans. Pure and
//! deterministic: every peer that read the same declarations computes the same groups, the same
//! member order and the same shard sizes, whatever order it read them in.
//!
//! Large swarms are cut into groups of at most `max_group` (Moshpit-style): the assignment is
//! a hash of (round seed, peer), so each round mixes peers differently and averages spread
//! across groups over successive rounds.

use super::balance::{BalanceError, Link, PeerMode, optimal_split};
use super::partition::{PartLen, auto_part_len, shard_sizes};
use super::round::RoundSpec;

/// What a peer declares for a round.
#[derive(Clone, Debug, PartialEq)]
pub struct Declaration {
    /// A stable, unique identifier of the peer (its peer id bytes).
    pub peer: Vec<u8>,
    pub mode: PeerMode,
    /// Samples accumulated (the weight of its data).
    pub weight: f64,
    /// Bytes per second.
    pub up: f64,
    pub down: f64,
}

/// One group's plan.
#[derive(Clone, Debug, PartialEq)]
pub struct GroupPlan {
    /// Member peer ids in round order (index i reduces shard i).
    pub members: Vec<Vec<u8>>,
    pub spec: RoundSpec,
    /// Predicted seconds for a vector of `len` f32 values at the declared bandwidths.
    pub predicted_s: f64,
}

#[derive(Clone, Copy, Debug)]
pub struct GroupRules {
    /// Elements in the vector.
    pub len: usize,
    pub part_len: PartLen,
    /// Shards smaller than this go to others.
    pub min_shard: usize,
    /// Largest group (None: one group for everyone).
    pub max_group: Option<usize>,
    /// Round seed (e.g. the epoch): changes the Moshpit assignment.
    pub seed: u64,
}

fn mix(seed: u64, bytes: &[u8]) -> u64 {
    // FNV-1a over the seed and the peer id, then a final avalanche (splitmix64).
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// Groups and plans for `decls`. Declarations with bad bandwidths or weights are ignored; a
/// peer declared twice counts once (its first declaration in peer order). Groups that cannot
/// form (no aggregator, or no sender) are left out: their peers fall back to local steps.
pub fn plan_groups(decls: &[Declaration], rules: GroupRules) -> Vec<GroupPlan> {
    let mut valid: Vec<&Declaration> = decls
        .iter()
        .filter(|d| d.up.is_finite() && d.down.is_finite() && d.up > 0.0 && d.down > 0.0)
        .filter(|d| d.weight.is_finite() && d.weight >= 0.0)
        .collect();
    valid.sort_by(|a, b| a.peer.cmp(&b.peer));
    valid.dedup_by(|a, b| a.peer == b.peer);
    if valid.is_empty() {
        return Vec::new();
    }
    let groups = match rules.max_group {
        Some(max) if max >= 2 && valid.len() > max => {
            let count = valid.len().div_ceil(max);
            // Order by hash, then deal round-robin: group sizes differ by at most one.
            let mut order = valid.clone();
            order.sort_by_key(|d| (mix(rules.seed, &d.peer), d.peer.clone()));
            let mut groups = vec![Vec::new(); count];
            for (i, d) in order.into_iter().enumerate() {
                groups[i % count].push(d);
            }
            for g in &mut groups {
                g.sort_by(|a, b| a.peer.cmp(&b.peer));
            }
            groups
        }
        _ => vec![valid],
    };
    groups
        .into_iter()
        .map(leader_first)
        .filter_map(|g| plan_one(&g, rules).ok())
        .collect()
}

/// Orders a group (sorted by peer id) for its plan: member 0 leads (proposes and commits), so
/// it must accept inbound connections: the lowest-id member that is not a client goes first,
/// the rest keep their order. Two clients cannot reach each other, so a client leader would
/// strand every other client (seen in the `clients` benchmark whenever a client drew the
/// lowest id).
fn leader_first(mut group: Vec<&Declaration>) -> Vec<&Declaration> {
    if let Some(i) = group.iter().position(|d| d.mode != PeerMode::Client) {
        let leader = group.remove(i);
        group.insert(0, leader);
    }
    group
}

fn plan_one(group: &[&Declaration], rules: GroupRules) -> Result<GroupPlan, BalanceError> {
    let links: Vec<Link> = group
        .iter()
        .map(|d| Link {
            up: d.up,
            down: d.down,
            mode: d.mode,
        })
        .collect();
    let plan = optimal_split(&links)?;
    let shard_sizes = shard_sizes(rules.len, &plan.fractions, rules.min_shard);
    let part_len = match rules.part_len {
        PartLen::Fixed(n) => n.max(1),
        PartLen::Auto(rule) => {
            let slowest_up = group
                .iter()
                .filter(|d| d.mode.sends())
                .map(|d| d.up)
                .fold(f64::INFINITY, f64::min);
            let aggregators = shard_sizes.iter().filter(|s| **s > 0).count();
            auto_part_len(&rule, slowest_up, aggregators)
        }
    };
    let spec = RoundSpec {
        modes: group.iter().map(|d| d.mode).collect(),
        weights: group
            .iter()
            .map(|d| if d.mode.sends() { d.weight } else { 0.0 })
            .collect(),
        shard_sizes,
        part_len,
        aggregation: Default::default(),
    };
    Ok(GroupPlan {
        members: group.iter().map(|d| d.peer.clone()).collect(),
        predicted_s: plan.time_per_byte * 4.0 * rules.len as f64,
        spec,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decl(i: u8, mode: PeerMode, bw: f64) -> Declaration {
        Declaration {
            peer: vec![i, 7, i.wrapping_mul(31)],
            mode,
            weight: f64::from(i) + 1.0,
            up: bw,
            down: bw,
        }
    }

    fn rules(max_group: Option<usize>, seed: u64) -> GroupRules {
        GroupRules {
            len: 10_000,
            part_len: PartLen::Fixed(512),
            min_shard: 16,
            max_group,
            seed,
        }
    }

    #[test]
    fn auto_part_len_follows_the_slowest_sender() {
        use crate::allreduce::partition::PartRule;
        let mbit = [400.0, 200.0, 100.0, 100.0, 50.0, 50.0, 25.0, 25.0];
        let mut decls: Vec<Declaration> = (0..8)
            .map(|i| decl(i, PeerMode::Node, mbit[i as usize] * 1e6 / 8.0))
            .collect();
        // A low clamp, so that the clamp does not hide what the rule does.
        let rule = PartRule {
            min: 1024,
            ..PartRule::default()
        };
        let r = GroupRules {
            len: 16 << 20,
            part_len: PartLen::Auto(rule),
            min_shard: 4096,
            max_group: None,
            seed: 0,
        };
        let plan = &plan_groups(&decls, r)[0];
        let aggregators = plan.spec.shard_sizes.iter().filter(|s| **s > 0).count();
        assert!(aggregators < 8, "the slow peers aggregate nothing");
        assert_eq!(
            plan.spec.part_len,
            auto_part_len(&rule, 25e6 / 8.0, aggregators)
        );
        // An aux peer sends nothing: its slow upload does not shorten the parts.
        decls.push(decl(9, PeerMode::Aux, 1e6 / 8.0));
        let with_aux = &plan_groups(&decls, r)[0];
        let aggregators = with_aux.spec.shard_sizes.iter().filter(|s| **s > 0).count();
        assert_eq!(
            with_aux.spec.part_len,
            auto_part_len(&rule, 25e6 / 8.0, aggregators)
        );
        // A slow client does.
        decls.push(decl(10, PeerMode::Client, 5e6 / 8.0));
        let with_client = &plan_groups(&decls, r)[0];
        assert!(with_client.spec.part_len < with_aux.spec.part_len);
    }

    #[test]
    fn the_leader_accepts_connections() {
        // Peers 0 and 1 (the lowest ids) are clients: peer 2 leads, the others follow in id
        // order, and the clients still take no shard.
        let modes = [
            PeerMode::Client,
            PeerMode::Client,
            PeerMode::Node,
            PeerMode::Aux,
            PeerMode::Node,
        ];
        let decls: Vec<Declaration> = (0..5).map(|i| decl(i, modes[i as usize], 100.0)).collect();
        let plan = &plan_groups(&decls, rules(None, 0))[0];
        let ids: Vec<Vec<u8>> = [2, 0, 1, 3, 4]
            .iter()
            .map(|&i| decls[i].peer.clone())
            .collect();
        assert_eq!(plan.members, ids);
        assert_eq!(plan.spec.modes[0], PeerMode::Node);
        assert_eq!(plan.spec.shard_sizes[1], 0);
        assert_eq!(plan.spec.shard_sizes[2], 0);
        // Only clients: nobody can aggregate, so there is no group at all.
        let clients: Vec<Declaration> = (0..3).map(|i| decl(i, PeerMode::Client, 100.0)).collect();
        assert!(plan_groups(&clients, rules(None, 0)).is_empty());
    }

    #[test]
    fn order_of_reading_does_not_matter() {
        let decls: Vec<Declaration> = (0..9)
            .map(|i| {
                decl(
                    i,
                    if i % 4 == 3 {
                        PeerMode::Client
                    } else {
                        PeerMode::Node
                    },
                    10.0 * f64::from(i + 1),
                )
            })
            .collect();
        let a = plan_groups(&decls, rules(None, 1));
        let mut rev = decls.clone();
        rev.reverse();
        rev.push(decls[2].clone()); // a duplicate read
        assert_eq!(plan_groups(&rev, rules(None, 1)), a);
        assert_eq!(a.len(), 1);
        let g = &a[0];
        assert_eq!(g.spec.shard_sizes.iter().sum::<usize>(), 10_000);
        for (i, m) in g.spec.modes.iter().enumerate() {
            if *m == PeerMode::Client {
                assert_eq!(g.spec.shard_sizes[i], 0);
            }
        }
    }

    #[test]
    fn moshpit_groups_are_balanced_and_mix_between_rounds() {
        let decls: Vec<Declaration> = (0..20).map(|i| decl(i, PeerMode::Node, 100.0)).collect();
        let r1 = plan_groups(&decls, rules(Some(6), 1));
        let r2 = plan_groups(&decls, rules(Some(6), 2));
        assert_eq!(r1.len(), 4);
        let sizes: Vec<usize> = r1.iter().map(|g| g.members.len()).collect();
        assert!(sizes.iter().all(|s| *s == 5), "{sizes:?}");
        let mut all: Vec<Vec<u8>> = r1.iter().flat_map(|g| g.members.clone()).collect();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), 20, "every peer in exactly one group");
        assert_ne!(
            r1.iter().map(|g| g.members.clone()).collect::<Vec<_>>(),
            r2.iter().map(|g| g.members.clone()).collect::<Vec<_>>(),
            "another seed regroups"
        );
    }

    #[test]
    fn bad_declarations_and_impossible_groups_are_left_out() {
        let mut decls = vec![
            decl(1, PeerMode::Node, 10.0),
            decl(2, PeerMode::Node, f64::NAN),
        ];
        decls.push(Declaration {
            weight: -1.0,
            ..decl(3, PeerMode::Node, 10.0)
        });
        let p = plan_groups(&decls, rules(None, 0));
        assert_eq!(p[0].members, vec![decls[0].peer.clone()]);
        let clients: Vec<Declaration> = (0..3).map(|i| decl(i, PeerMode::Client, 10.0)).collect();
        assert!(plan_groups(&clients, rules(None, 0)).is_empty());
        assert!(plan_groups(&[], rules(None, 0)).is_empty());
    }
}
