//! Data pipelines: corpus reading, tokenizer, pretraining examples; images and SwAV's crops.

pub mod images;
pub mod mlm;
pub mod text;
pub mod tokenizer;
