//! Data pipelines: corpus reading, tokenizer, pretraining examples.

pub mod mlm;
pub mod text;
pub mod tokenizer;
