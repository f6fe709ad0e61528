//! Cutting the flattened vector into shards (one per aggregator, sized by the load-balancing
//! plan) and shards into parts (the unit that is streamed, reduced and returned).

use std::ops::Range;

/// Integer shard sizes that sum to `total`, proportional to `fractions` (largest-remainder
/// rounding, ties to the lower index). Shards smaller than `min_size` elements are given to
/// the others, so no peer is asked to reduce a sliver not worth a round trip.
pub fn shard_sizes(total: usize, fractions: &[f64], min_size: usize) -> Vec<usize> {
    let mut f: Vec<f64> = fractions
        .iter()
        .map(|x| if x.is_finite() && *x > 0.0 { *x } else { 0.0 })
        .collect();
    loop {
        let sizes = round(total, &f);
        // Drop the smallest non-empty shard below the minimum, then re-round.
        let small = (0..sizes.len())
            .filter(|&i| sizes[i] > 0 && sizes[i] < min_size)
            .min_by_key(|&i| (sizes[i], i));
        match small {
            Some(i) if f.iter().filter(|x| **x > 0.0).count() > 1 => f[i] = 0.0,
            _ => return sizes,
        }
    }
}

fn round(total: usize, f: &[f64]) -> Vec<usize> {
    let sum: f64 = f.iter().sum();
    if sum <= 0.0 || f.is_empty() {
        // Nothing to go on: equal split.
        let n = f.len().max(1);
        return (0..f.len())
            .map(|i| total / n + usize::from(i < total % n))
            .collect();
    }
    let exact: Vec<f64> = f.iter().map(|x| x / sum * total as f64).collect();
    let mut sizes: Vec<usize> = exact.iter().map(|x| x.floor() as usize).collect();
    let mut left = total - sizes.iter().sum::<usize>();
    let mut order: Vec<usize> = (0..f.len()).filter(|&i| f[i] > 0.0).collect();
    order.sort_by(|&a, &b| {
        (exact[b] - exact[b].floor())
            .total_cmp(&(exact[a] - exact[a].floor()))
            .then(a.cmp(&b))
    });
    for &i in order.iter().cycle() {
        if left == 0 {
            break;
        }
        sizes[i] += 1;
        left -= 1;
    }
    sizes
}

/// The element ranges of each shard, in order.
pub fn shard_ranges(sizes: &[usize]) -> Vec<Range<usize>> {
    let mut start = 0;
    sizes
        .iter()
        .map(|&s| {
            let r = start..start + s;
            start += s;
            r
        })
        .collect()
}

/// Lengths of the parts of a shard of `len` elements, each at most `part_len` (≥ 1).
pub fn part_lens(len: usize, part_len: usize) -> Vec<usize> {
    let part_len = part_len.max(1);
    let mut out = vec![part_len; len / part_len];
    if !len.is_multiple_of(part_len) {
        out.push(len % part_len);
    }
    out
}

/// How long a part should be.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum PartLen {
    /// This many elements.
    Fixed(usize),
    /// From the group's bandwidths, see [`auto_part_len`].
    Auto(PartRule),
}

/// The pipeline-fill rule for [`PartLen::Auto`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PartRule {
    /// Target time for the slowest sender to put `window` parts on the wire to every
    /// aggregator, seconds.
    pub fill_s: f64,
    /// Messages in flight per destination (the transport's window).
    pub window: usize,
    /// Wire bytes per element (after compression).
    pub bytes_per_elem: f64,
    /// Clamp, elements.
    pub min: usize,
    pub max: usize,
}

impl Default for PartRule {
    fn default() -> Self {
        Self {
            fill_s: 0.2,
            window: 2,
            bytes_per_elem: 4.0,
            // Below ~16 Ki elements the cost per message (a stream, its negotiation, an ack)
            // dominates: measured 8 Ki slower than 16 Ki on `hetero`, 6 Ki slower than 16 Ki
            // on `asym`.
            min: 16 * 1024,
            max: 64 * 1024,
        }
    }
}

/// Elements per part for a group whose slowest sender uploads `slowest_up` bytes per second
/// to `aggregators` aggregators.
///
/// Before the first average can come back, every sender must deliver a part to each
/// aggregator, and the transport interleaves the `window` parts it has in flight to each of
/// them; so the slowest sender's links idle-wait (its download has nothing to receive yet)
/// for about `window · aggregators · part bytes / slowest_up`, and the same again at the end.
/// Small parts shorten that fill; each part also costs a message and a round trip. The rule
/// picks the length whose fill takes `fill_s`, rounded down to a multiple of 1024, clamped to
/// `[min, max]` (16–64 Ki elements by default). On the benchmark profiles, from the probed bandwidths, it gives 17 Ki elements
/// on `hetero` (23.5 Mbit/s slowest sender, 4 aggregators; the best fixed length measured
/// there was 16 Ki) and 35 Ki on `uniform` (93.5 Mbit/s, 8 aggregators).
pub fn auto_part_len(rule: &PartRule, slowest_up: f64, aggregators: usize) -> usize {
    let (min, max) = (rule.min.max(1), rule.max.max(rule.min.max(1)));
    let denom = rule.window.max(1) as f64 * aggregators.max(1) as f64 * rule.bytes_per_elem;
    let raw = rule.fill_s * slowest_up / denom;
    if !(raw.is_finite() && raw > 0.0) {
        return min;
    }
    let len = (raw as usize) / 1024 * 1024;
    len.clamp(min, max)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::allreduce::balance::{Link, PeerMode, optimal_split, time_per_byte};

    #[test]
    fn auto_part_len_fills_the_pipeline_in_the_target_time() {
        let rule = PartRule::default();
        // 25 Mbit/s slowest sender, 4 aggregators: 0.2 s · 3.125 MB/s / (2 · 4 · 4 B).
        assert_eq!(auto_part_len(&rule, 25e6 / 8.0, 4), 19 * 1024);
        // 100 Mbit/s, 8 aggregators.
        assert_eq!(auto_part_len(&rule, 100e6 / 8.0, 8), 38 * 1024);
        // Clamped both ways; nonsense gives the minimum.
        assert_eq!(auto_part_len(&rule, 10e9, 2), rule.max);
        assert_eq!(auto_part_len(&rule, 1e5, 16), rule.min);
        assert_eq!(auto_part_len(&rule, f64::NAN, 4), rule.min);
        assert_eq!(auto_part_len(&rule, 1e7, 0), auto_part_len(&rule, 1e7, 1));
        // Compression halves the bytes per element: twice the elements.
        let fp16 = PartRule {
            bytes_per_elem: 2.0,
            ..rule
        };
        assert_eq!(auto_part_len(&fp16, 25e6 / 8.0, 4), 38 * 1024);
        // Never decreasing in bandwidth, never increasing in aggregators.
        let mut last = 0;
        for up in (1..200).map(|m| f64::from(m) * 1e6 / 8.0) {
            let l = auto_part_len(&rule, up, 6);
            assert!(l >= last && l.is_multiple_of(1024));
            last = l;
        }
        assert!(auto_part_len(&rule, 5e6, 3) >= auto_part_len(&rule, 5e6, 9));
    }

    #[test]
    fn sizes_sum_and_follow_fractions() {
        let s = shard_sizes(1000, &[0.5, 0.3, 0.2], 1);
        assert_eq!(s, vec![500, 300, 200]);
        let s = shard_sizes(10, &[1.0, 1.0, 1.0], 1);
        assert_eq!(s.iter().sum::<usize>(), 10);
        assert_eq!(s, vec![4, 3, 3]);
        assert_eq!(shard_sizes(7, &[0.0, 0.0], 1), vec![4, 3]);
        assert_eq!(shard_sizes(5, &[0.0, 1.0, f64::NAN], 1), vec![0, 5, 0]);
    }

    #[test]
    fn slivers_go_to_the_others() {
        // hivemind's worked case: (60, [.55, .44, .40], min_size=10) → (41, 19, 0) for its
        // own scores; here: a 3-element shard below min 10 is folded into the others.
        let s = shard_sizes(100, &[0.6, 0.37, 0.03], 10);
        assert_eq!(s.iter().sum::<usize>(), 100);
        assert_eq!(s[2], 0);
        assert!(s[0] > s[1]);
    }

    #[test]
    fn parts_cover_the_shard() {
        assert_eq!(part_lens(10, 4), vec![4, 4, 2]);
        assert_eq!(part_lens(8, 4), vec![4, 4]);
        assert!(part_lens(0, 4).is_empty());
        assert_eq!(shard_ranges(&[3, 0, 2]), vec![0..3, 3..3, 3..5]);
    }

    #[test]
    fn as_good_as_hivemind_reference_split() {
        // hivemind's test: bandwidths [.3, .5, .9] on 1024 elements → [0, 255, 769]. The LP
        // has several optima; ours must cost no more than the reference.
        let links: Vec<Link> = [0.3, 0.5, 0.9]
            .iter()
            .map(|&b| Link {
                up: b,
                down: b,
                mode: PeerMode::Node,
            })
            .collect();
        let plan = optimal_split(&links).unwrap();
        let ours = shard_sizes(1024, &plan.fractions, 1);
        let frac = |s: &[usize]| s.iter().map(|&x| x as f64 / 1024.0).collect::<Vec<_>>();
        let reference = [0usize, 255, 769];
        assert!(
            time_per_byte(&links, &frac(&ours)) <= time_per_byte(&links, &frac(&reference)) + 1e-12
        );
    }
}
