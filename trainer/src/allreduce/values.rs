//! Shared, read-only runs of `f32`: a part of the input vector or an averaged part handed to
//! the transport without copying it (a round used to copy its whole vector into messages
//! before the first byte could leave; an average sent to seven senders was copied seven
//! times).

use std::fmt;
use std::ops::{Deref, Range};
use std::sync::Arc;

/// `buf[range]`, shared.
#[derive(Clone)]
pub struct Values {
    buf: Arc<Vec<f32>>,
    range: Range<usize>,
}

impl Values {
    /// A view of `buf[range]`; panics if the range is out of bounds (a bug, not input).
    pub fn slice(buf: &Arc<Vec<f32>>, range: Range<usize>) -> Self {
        assert!(
            range.start <= range.end && range.end <= buf.len(),
            "range {range:?} outside a buffer of {}",
            buf.len()
        );
        Self {
            buf: buf.clone(),
            range,
        }
    }
}

impl From<Vec<f32>> for Values {
    fn from(v: Vec<f32>) -> Self {
        let range = 0..v.len();
        Self {
            buf: Arc::new(v),
            range,
        }
    }
}

impl Deref for Values {
    type Target = [f32];

    fn deref(&self) -> &[f32] {
        &self.buf[self.range.clone()]
    }
}

impl PartialEq for Values {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

impl fmt::Debug for Values {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.len() <= 8 {
            write!(f, "Values({:?})", &**self)
        } else {
            write!(f, "Values({} values, {:?}…)", self.len(), &self[..8])
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn views_share_and_compare_by_content() {
        let buf = Arc::new((0..10).map(|x| x as f32).collect::<Vec<_>>());
        let a = Values::slice(&buf, 2..5);
        assert_eq!(&*a, &[2.0, 3.0, 4.0]);
        assert_eq!(a, Values::from(vec![2.0, 3.0, 4.0]));
        assert_eq!(Arc::strong_count(&buf), 2, "no copy");
        assert_eq!(Values::slice(&buf, 4..4).len(), 0);
        assert!(format!("{:?}", Values::slice(&buf, 0..10)).contains("10 values"));
    }

    #[test]
    #[should_panic(expected = "outside a buffer")]
    fn out_of_range_is_a_bug() {
        let _ = Values::slice(&Arc::new(vec![0.0; 3]), 2..4);
    }
}
