//! Load balancing for the butterfly all-reduce: how much of the vector each aggregator
//! reduces, from the peers' bandwidths, and the time bounds to measure against.
//!
//! Model (hivemind's, extended to aux and client peers and to asymmetric links): the vector has
//! M bytes; senders S (node and client peers) each hold one copy; aggregators A (node and aux
//! peers) each reduce a fraction f_i of it (Σ f_i = 1). Peer i moves, in each direction,
//!
//! ```text
//! vol_i = M · ( [i∈S](1 − f_i) + f_i (|S| − [i∈S]) )
//! ```
//!
//! (it sends the parts it does not reduce and receives their averages back; it receives the
//! other senders' parts of its own shard and sends the averages back). With full-duplex links
//! the round takes `T = max_i vol_i / b_i` where `b_i = min(up_i, down_i)`. Minimising T over f
//! is a linear programme; its optimum has a water-filling closed form, solved exactly here by
//! walking the breakpoints of the piecewise-linear `Σ f_i(T)`.

/// What a peer does in a round.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeerMode {
    /// Sends its data and reduces a shard.
    Node,
    /// Sends its data, reduces nothing (accepts no inbound connections).
    Client,
    /// Reduces a shard, contributes no data.
    Aux,
}

impl PeerMode {
    pub fn sends(self) -> bool {
        matches!(self, PeerMode::Node | PeerMode::Client)
    }
    pub fn aggregates(self) -> bool {
        matches!(self, PeerMode::Node | PeerMode::Aux)
    }
}

/// One peer's links, in bytes per second.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Link {
    pub up: f64,
    pub down: f64,
    pub mode: PeerMode,
}

/// Why a group cannot be balanced.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum BalanceError {
    #[error("a group needs at least one peer that aggregates (node or aux)")]
    NoAggregator,
    #[error("a group needs at least one peer that sends data (node or client)")]
    NoSender,
    #[error("peer {0} has a non-positive or non-finite bandwidth")]
    BadBandwidth(usize),
}

/// The shard fractions (Σ = 1 over aggregators, 0 for clients) and the predicted time per
/// byte of vector (`T / M`, seconds per byte).
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    pub fractions: Vec<f64>,
    pub time_per_byte: f64,
}

fn coefficients(links: &[Link], i: usize) -> (f64, f64) {
    let senders = links.iter().filter(|l| l.mode.sends()).count() as f64;
    let s = if links[i].mode.sends() { 1.0 } else { 0.0 };
    // vol_i / M = c + a f_i
    (s, senders - 2.0 * s)
}

/// The time per byte of a given split: `max_i vol_i / (M b_i)`.
pub fn time_per_byte(links: &[Link], fractions: &[f64]) -> f64 {
    (0..links.len())
        .map(|i| {
            let (c, a) = coefficients(links, i);
            (c + a * fractions[i]) / links[i].up.min(links[i].down)
        })
        .fold(0.0, f64::max)
}

/// The optimal split for butterfly all-reduce (exact water-filling).
pub fn optimal_split(links: &[Link]) -> Result<Plan, BalanceError> {
    for (i, l) in links.iter().enumerate() {
        if !(l.up.is_finite() && l.down.is_finite() && l.up > 0.0 && l.down > 0.0) {
            return Err(BalanceError::BadBandwidth(i));
        }
    }
    let aggs: Vec<usize> = (0..links.len())
        .filter(|&i| links[i].mode.aggregates())
        .collect();
    if aggs.is_empty() {
        return Err(BalanceError::NoAggregator);
    }
    if !links.iter().any(|l| l.mode.sends()) {
        return Err(BalanceError::NoSender);
    }
    let b = |i: usize| links[i].up.min(links[i].down);
    let mut fractions = vec![0.0; links.len()];

    // Aggregators whose load does not grow with their shard (a ≤ 0: a group of at most two
    // senders) can take everything at no cost; give it to the fastest of them.
    let free: Vec<usize> = aggs
        .iter()
        .copied()
        .filter(|&i| coefficients(links, i).1 <= 0.0)
        .collect();
    if let Some(&best) = free.iter().max_by(|&&x, &&y| b(x).total_cmp(&b(y))) {
        fractions[best] = 1.0;
        return Ok(Plan {
            time_per_byte: time_per_byte(links, &fractions),
            fractions,
        });
    }

    // f_i(T) = max(0, (T b_i − c_i) / a_i); Σ f_i(T) is piecewise linear and increasing.
    // Walk the breakpoints T_i = c_i / b_i in order until the sum reaches 1.
    let mut bps: Vec<(f64, usize)> = aggs
        .iter()
        .map(|&i| (coefficients(links, i).0 / b(i), i))
        .collect();
    bps.sort_by(|x, y| x.0.total_cmp(&y.0));
    let (mut slope, mut offset) = (0.0, 0.0); // Σ f = slope·T − offset over active aggregators
    let mut t = bps[0].0;
    for k in 0..bps.len() {
        let (tk, i) = bps[k];
        let (c, a) = coefficients(links, i);
        slope += b(i) / a;
        offset += c / a;
        let next = bps.get(k + 1).map_or(f64::INFINITY, |x| x.0);
        let solve = (1.0 + offset) / slope;
        if solve <= next {
            t = solve.max(tk);
            break;
        }
    }
    for &i in &aggs {
        let (c, a) = coefficients(links, i);
        fractions[i] = ((t * b(i) - c) / a).max(0.0);
    }
    let sum: f64 = fractions.iter().sum();
    for f in &mut fractions {
        *f /= sum;
    }
    Ok(Plan {
        time_per_byte: time_per_byte(links, &fractions),
        fractions,
    })
}

/// The lower bound on any all-reduce's time per byte (research/dedloc.md §6): every sender
/// uploads its vector, every sender downloads the result, and all peers together move
/// 2(n−1) vectors each way.
pub fn lower_bound_per_byte(links: &[Link]) -> f64 {
    let senders: Vec<&Link> = links.iter().filter(|l| l.mode.sends()).collect();
    let n = senders.len() as f64;
    if n < 2.0 {
        return 0.0;
    }
    let max_inv_up = senders.iter().map(|l| 1.0 / l.up).fold(0.0, f64::max);
    let max_inv_down = senders.iter().map(|l| 1.0 / l.down).fold(0.0, f64::max);
    let sum_up: f64 = links.iter().map(|l| l.up).sum();
    let sum_down: f64 = links.iter().map(|l| l.down).sum();
    let total = 2.0 * (n - 1.0);
    max_inv_up
        .max(max_inv_down)
        .max(total / sum_up)
        .max(total / sum_down)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sym(bw: &[f64]) -> Vec<Link> {
        bw.iter()
            .map(|&b| Link {
                up: b,
                down: b,
                mode: PeerMode::Node,
            })
            .collect()
    }

    #[test]
    fn uniform_split_is_equal_and_meets_the_bound() {
        let links = sym(&[100.0; 8]);
        let p = optimal_split(&links).unwrap();
        for f in &p.fractions {
            assert!((f - 0.125).abs() < 1e-12);
        }
        let lb = lower_bound_per_byte(&links);
        assert!(
            (p.time_per_byte - lb).abs() < 1e-12,
            "{} vs {lb}",
            p.time_per_byte
        );
        assert!((lb - 2.0 * 7.0 / 800.0).abs() < 1e-15);
    }

    #[test]
    fn hetero_profile_is_optimal_with_symmetric_links() {
        // benchmarks.md `hetero`: the LP optimum equals the lower bound for symmetric links.
        let links = sym(&[400.0, 200.0, 100.0, 100.0, 50.0, 50.0, 25.0, 25.0]);
        let p = optimal_split(&links).unwrap();
        let lb = lower_bound_per_byte(&links);
        assert!(
            (p.time_per_byte - lb).abs() / lb < 1e-9,
            "{} vs {lb}",
            p.time_per_byte
        );
        assert!((p.fractions.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        assert!(p.fractions[0] > p.fractions[2] && p.fractions[2] >= p.fractions[7]);
    }

    /// Slow oracle: the exact optimum is never worse than a brute-force grid search over the
    /// splits of three aggregators, and the grid comes within its resolution of it.
    #[test]
    fn matches_brute_force_on_small_groups() {
        let cases = [
            sym(&[10.0, 20.0, 30.0]),
            sym(&[1.0, 1.0, 50.0]),
            vec![
                Link {
                    up: 5.0,
                    down: 50.0,
                    mode: PeerMode::Node,
                },
                Link {
                    up: 20.0,
                    down: 20.0,
                    mode: PeerMode::Node,
                },
                Link {
                    up: 30.0,
                    down: 10.0,
                    mode: PeerMode::Aux,
                },
                Link {
                    up: 8.0,
                    down: 8.0,
                    mode: PeerMode::Client,
                },
            ],
        ];
        for links in cases {
            let p = optimal_split(&links).unwrap();
            let aggs: Vec<usize> = (0..links.len())
                .filter(|&i| links[i].mode.aggregates())
                .collect();
            assert_eq!(aggs.len(), 3);
            let sub = |f3: [f64; 3]| {
                let mut f = vec![0.0; links.len()];
                for (k, &i) in aggs.iter().enumerate() {
                    f[i] = f3[k];
                }
                f
            };
            let steps = 400;
            let mut best = f64::INFINITY;
            for x in 0..=steps {
                for y in 0..=(steps - x) {
                    let f3 = [
                        x as f64 / steps as f64,
                        y as f64 / steps as f64,
                        (steps - x - y) as f64 / steps as f64,
                    ];
                    best = best.min(time_per_byte(&links, &sub(f3)));
                }
            }
            assert!(
                p.time_per_byte <= best * (1.0 + 1e-9),
                "{} > grid {best}",
                p.time_per_byte
            );
            assert!(
                p.time_per_byte >= best * (1.0 - 0.02),
                "grid search should come close"
            );
        }
    }

    #[test]
    fn clients_take_no_shard_and_slow_peers_can_be_idle() {
        let mut links = sym(&[100.0, 100.0, 100.0, 1.0]);
        links.push(Link {
            up: 100.0,
            down: 100.0,
            mode: PeerMode::Client,
        });
        let p = optimal_split(&links).unwrap();
        assert_eq!(p.fractions[4], 0.0);
        assert_eq!(p.fractions[3], 0.0, "a 1-unit peer reduces nothing");
        // Its own upload of one vector still bounds the round.
        assert!((p.time_per_byte - 1.0).abs() < 1e-12);
    }

    #[test]
    fn two_senders_and_degenerate_groups() {
        let p = optimal_split(&sym(&[10.0, 30.0])).unwrap();
        assert!((p.fractions.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        assert!((p.time_per_byte - 0.1).abs() < 1e-12);
        let only_clients = vec![
            Link {
                up: 1.0,
                down: 1.0,
                mode: PeerMode::Client
            };
            3
        ];
        assert_eq!(
            optimal_split(&only_clients),
            Err(BalanceError::NoAggregator)
        );
        let only_aux = vec![
            Link {
                up: 1.0,
                down: 1.0,
                mode: PeerMode::Aux
            };
            2
        ];
        assert_eq!(optimal_split(&only_aux), Err(BalanceError::NoSender));
        assert_eq!(
            optimal_split(&sym(&[1.0, 0.0])),
            Err(BalanceError::BadBandwidth(1))
        );
    }
}
