//! WordPiece tokenizer (Hugging Face `tokenizers`): trained on the corpus, or loaded from a
//! `tokenizer.json`. BERT normalisation (lower case, accents stripped) and pre-tokenisation.

use std::path::Path;

use tokenizers::decoders::wordpiece::WordPiece as WordPieceDecoder;
use tokenizers::models::TrainerWrapper;
use tokenizers::models::wordpiece::{WordPiece, WordPieceTrainer};
use tokenizers::normalizers::BertNormalizer;
use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
use tokenizers::{AddedToken, Tokenizer};

pub const PAD: &str = "[PAD]";
pub const UNK: &str = "[UNK]";
pub const CLS: &str = "[CLS]";
pub const SEP: &str = "[SEP]";
pub const MASK: &str = "[MASK]";
const SPECIALS: [&str; 5] = [PAD, UNK, CLS, SEP, MASK];

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("tokenizer: {0}")]
    Hf(String),
    #[error("tokenizer has no {0} token")]
    MissingSpecial(&'static str),
}

fn hf(e: impl std::fmt::Display) -> TokenizerError {
    TokenizerError::Hf(e.to_string())
}

/// The special tokens' ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Specials {
    pub pad: u32,
    pub unk: u32,
    pub cls: u32,
    pub sep: u32,
    pub mask: u32,
}

/// A tokenizer with the special tokens MLM needs.
#[derive(Clone)]
pub struct TextTokenizer {
    inner: Tokenizer,
    pub specials: Specials,
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextTokenizer")
            .field("vocab", &self.vocab_size())
            .field("specials", &self.specials)
            .finish()
    }
}

impl TextTokenizer {
    /// Trains a WordPiece vocabulary of at most `vocab_size` on `texts`.
    pub fn train<I, S>(texts: I, vocab_size: usize) -> Result<Self, TokenizerError>
    where
        I: Iterator<Item = S> + Send,
        S: AsRef<str> + Send,
    {
        let mut tk = Tokenizer::new(WordPiece::default());
        tk.with_normalizer(Some(BertNormalizer::default()));
        tk.with_pre_tokenizer(Some(BertPreTokenizer));
        tk.with_decoder(Some(WordPieceDecoder::default()));
        let mut trainer: TrainerWrapper = WordPieceTrainer::builder()
            .vocab_size(vocab_size)
            .min_frequency(2)
            .show_progress(false)
            .special_tokens(
                SPECIALS
                    .iter()
                    .map(|s| AddedToken::from(*s, true))
                    .collect(),
            )
            .build()
            .into();
        tk.train(&mut trainer, texts).map_err(hf)?;
        // The trainer numbers tokens in hash-map order, which differs between runs: renumber
        // (specials first, then by token text). WordPiece's greedy longest match does not
        // depend on the ids. Ties between merges are still broken in hash order, so two
        // trainings of one corpus can differ in a few tokens: a run shares ONE tokenizer file
        // (the fingerprint keeps peers with another one apart).
        let mut vocab: Vec<(String, u32)> = tk.get_vocab(false).into_iter().collect();
        vocab.sort_by(|a, b| {
            let rank = |t: &str| {
                SPECIALS
                    .iter()
                    .position(|s| *s == t)
                    .unwrap_or(SPECIALS.len())
            };
            (rank(&a.0), &a.0).cmp(&(rank(&b.0), &b.0))
        });
        let map: serde_json::Map<String, serde_json::Value> = vocab
            .into_iter()
            .enumerate()
            .map(|(i, (t, _))| (t, serde_json::Value::from(i as u32)))
            .collect();
        let json = serde_json::json!({
            "type": "WordPiece",
            "unk_token": UNK,
            "continuing_subword_prefix": "##",
            "max_input_chars_per_word": 100,
            "vocab": map,
        });
        let model: WordPiece = serde_json::from_str(&json.to_string()).map_err(hf)?;
        tk.with_model(model);
        Self::wrap(tk)
    }

    /// Loads a `tokenizer.json` (any model; it must have the five BERT special tokens).
    pub fn load(path: &Path) -> Result<Self, TokenizerError> {
        Self::wrap(Tokenizer::from_file(path).map_err(hf)?)
    }

    /// Saves as `tokenizer.json`.
    pub fn save(&self, path: &Path) -> Result<(), TokenizerError> {
        self.inner.save(path, false).map_err(hf)
    }

    fn wrap(inner: Tokenizer) -> Result<Self, TokenizerError> {
        let id = |t: &'static str| {
            inner
                .token_to_id(t)
                .ok_or(TokenizerError::MissingSpecial(t))
        };
        let specials = Specials {
            pad: id(PAD)?,
            unk: id(UNK)?,
            cls: id(CLS)?,
            sep: id(SEP)?,
            mask: id(MASK)?,
        };
        Ok(Self { inner, specials })
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Token ids of `text`, without special tokens.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        Ok(self
            .inner
            .encode(text, false)
            .map_err(hf)?
            .get_ids()
            .to_vec())
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String, TokenizerError> {
        self.inner.decode(ids, true).map_err(hf)
    }

    /// A fingerprint of the vocabulary (peers must tokenize alike to share gradients).
    pub fn fingerprint(&self) -> Result<[u8; 32], TokenizerError> {
        use sha2::{Digest, Sha256};
        let mut vocab: Vec<(String, u32)> = self.inner.get_vocab(true).into_iter().collect();
        vocab.sort_by_key(|v| v.1);
        let mut h = Sha256::new();
        for (t, id) in vocab {
            h.update(id.to_le_bytes());
            h.update(t.as_bytes());
            h.update([0]);
        }
        // The pipeline around the model matters too (normaliser, pre-tokeniser).
        let json: serde_json::Value =
            serde_json::from_str(&self.inner.to_string(false).map_err(hf)?).map_err(hf)?;
        for part in ["normalizer", "pre_tokenizer", "post_processor"] {
            h.update(
                json.get(part)
                    .map(|v| v.to_string())
                    .unwrap_or_default()
                    .as_bytes(),
            );
        }
        Ok(h.finalize().into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trains_saves_and_loads_the_same_vocabulary() {
        let texts = [
            "The quick brown fox jumps over the lazy dog.",
            "The lazy dog sleeps; the quick fox runs.",
            "Foxes and dogs are animals.",
        ];
        let t = TextTokenizer::train(texts.iter(), 200).unwrap();
        assert_eq!(t.specials.pad, 0);
        let ids = t.encode("the quick dog").unwrap();
        assert!(!ids.is_empty());
        assert!(!ids.contains(&t.specials.unk), "{ids:?}");
        assert_eq!(t.decode(&ids).unwrap(), "the quick dog");
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("tokenizer.json");
        t.save(&p).unwrap();
        let u = TextTokenizer::load(&p).unwrap();
        assert_eq!(u.encode("the quick dog").unwrap(), ids);
        assert_eq!(u.fingerprint().unwrap(), t.fingerprint().unwrap());
    }

    #[test]
    fn a_corrupt_file_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("tokenizer.json");
        std::fs::write(&p, "{not json").unwrap();
        assert!(
            TextTokenizer::load(&p)
                .unwrap_err()
                .to_string()
                .starts_with("tokenizer:")
        );
    }
}
