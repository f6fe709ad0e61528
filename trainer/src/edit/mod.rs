//! Editable Training ("Editable Neural Networks", Sinitsin et al. 2020) and the pieces patch
//! jobs are made of: the editor, the editable digits classifiers, baseline and editable
//! training, the paper's metrics, model files, the patch checks and the patch log.
//!
//! The editable part is always a final linear head `z = W h + b`: its edit gradient is exact
//! in closed form, an SGD or momentum edit is exactly rank one (`ΔW = u hᵀ`), and a verifier
//! needs only the sample's features and the control set's features (the body never changes).

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
