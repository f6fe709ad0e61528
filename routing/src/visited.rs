//! Visited sets for graph searches: one array of generation stamps per search, reused across
//! searches (a new search bumps the generation instead of clearing), kept in a pool so that
//! concurrent searches each take their own.

use std::sync::Mutex;

/// Which vertices one search has seen.
#[derive(Debug)]
pub struct Visited {
    stamps: Vec<u16>,
    generation: u16,
}

impl Visited {
    fn new(n: usize) -> Self {
        Self {
            stamps: vec![0; n],
            generation: 0,
        }
    }

    /// Starts a new search over `n` vertices.
    pub fn reset(&mut self, n: usize) {
        if self.stamps.len() < n {
            self.stamps.resize(n, 0);
        }
        self.generation = self.generation.wrapping_add(1);
        if self.generation == 0 {
            self.stamps.fill(0);
            self.generation = 1;
        }
    }

    /// Marks `v`; true if it was not marked yet in this search.
    #[inline(always)]
    pub fn insert(&mut self, v: u32) -> bool {
        let s = &mut self.stamps[v as usize];
        if *s == self.generation {
            false
        } else {
            *s = self.generation;
            true
        }
    }
}

/// A pool of visited sets.
#[derive(Debug, Default)]
pub struct Pool {
    free: Mutex<Vec<Visited>>,
}

impl Pool {
    /// A cleared set for `n` vertices (from the pool, or new).
    pub fn take(&self, n: usize) -> Visited {
        let got = self.free.lock().ok().and_then(|mut f| f.pop());
        let mut v = got.unwrap_or_else(|| Visited::new(n));
        v.reset(n);
        v
    }

    pub fn give(&self, v: Visited) {
        if let Ok(mut f) = self.free.lock() {
            f.push(v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_search_forgets_what_the_last_one_saw() {
        let pool = Pool::default();
        let mut v = pool.take(10);
        assert!(v.insert(3));
        assert!(!v.insert(3));
        pool.give(v);
        let mut v = pool.take(20);
        assert!(v.insert(3));
        assert!(v.insert(19));
    }
}
