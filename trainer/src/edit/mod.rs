//! Editable Training ("Editable Neural Networks", Sinitsin et al. 2020) and the pieces patch
//! jobs are made of: the editor, the editable digits classifiers, baseline and editable
//! training, the paper's metrics, model files, the patch checks, the patch chain and the patch
//! log.
//!
//! The editable part of a patch is always a final linear head `z = W h + b` (the digits
//! classifiers' head, ALBERT's MLM decoder): its edit gradient is exact in closed form, an SGD,
//! momentum or line-search edit is exactly rank one (`ΔW = u hᵀ`), and a verifier needs only
//! the sample's features and the control set's features (the body never changes). `block`
//! edits a deeper block (the body's last layer with the head) with first-order Editable
//! Training; it has metrics but no patches.

pub mod block;
pub mod chain;
pub mod editor;
pub mod eval;
pub mod head;
pub mod log;
pub mod model;
pub mod net;
pub mod train;

pub use editor::{EditOutcome, EditorConfig, EditorKind, edit};
pub use head::Head;
