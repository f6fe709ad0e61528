//! The model's tokenizer and chat template: from a GGUF file's metadata (byte-level BPE, the
//! `gpt2` tokenizer model of llama.cpp) or a Hugging Face `tokenizer.json`.
//!
//! Byte-level BPE from GGUF: `tokenizer.ggml.tokens` (the vocabulary, in GPT-2's byte-to-unicode
//! alphabet), `tokenizer.ggml.merges` ("a b" per line, in rank order), `tokenizer.ggml.token_type`
//! (3 = control, 4 = user-defined: matched whole in the text, never split), and
//! `tokenizer.ggml.pre` naming the pre-tokenizer. The pre-tokenizers are llama.cpp's regex sets
//! expressed with the `tokenizers` crate's parts: `gpt2` = the GPT-2 regex; `smollm` (and the
//! other StarCoder-family names) = each digit alone, then the GPT-2 regex.

use std::path::Path;

use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::{AddedToken, PreTokenizerWrapper};

use crate::gguf::Gguf;

/// One chat message.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("the tokenizer: {0}")]
    Build(String),
    #[error("tokenizer model {0:?} is not supported (gpt2-style byte-level BPE is)")]
    Model(String),
    #[error(
        "pre-tokenizer {0:?} is not supported (gpt2, smollm, starcoder, refact, codeshell, qwen2 are)"
    )]
    Pre(String),
    #[error("the chat template: {0}")]
    Template(String),
}

/// A tokenizer with its special tokens and chat template.
#[derive(Debug, Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    /// Tokens that end a turn (EOS and the template's end-of-turn marker).
    pub stop: Vec<u32>,
    pub add_bos: bool,
    pub chat_template: Option<String>,
    bos_text: String,
    eos_text: String,
}

fn build_err(e: impl std::fmt::Display) -> TokenizerError {
    TokenizerError::Build(e.to_string())
}

impl Tokenizer {
    /// From a GGUF file's `tokenizer.ggml.*` metadata.
    pub fn from_gguf(g: &Gguf) -> Result<Self, TokenizerError> {
        let model = g.str("tokenizer.ggml.model").map_err(build_err)?;
        if model != "gpt2" {
            return Err(TokenizerError::Model(model.into()));
        }
        let tokens = g.strings("tokenizer.ggml.tokens").map_err(build_err)?;
        let merges = g.strings("tokenizer.ggml.merges").map_err(build_err)?;
        let types: Vec<u64> = g
            .get("tokenizer.ggml.token_type")
            .and_then(|v| v.as_array())
            .map(|a| a.iter().map(|x| x.as_u64().unwrap_or(1)).collect())
            .unwrap_or_default();
        let pre = g.str("tokenizer.ggml.pre").unwrap_or("gpt2");
        let vocab: tokenizers::models::bpe::Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.to_string(), i as u32))
            .collect();
        let merges: Vec<(String, String)> = merges
            .iter()
            .map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| TokenizerError::Build(format!("merge {m:?} is not \"a b\"")))
            })
            .collect::<Result<_, _>>()?;
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(build_err)?;
        let mut inner = tokenizers::Tokenizer::new(bpe);
        let byte_level = ByteLevel::new(false, true, true);
        let pre_tok: PreTokenizerWrapper = match pre {
            "gpt2" | "default" => byte_level.into(),
            "smollm" | "starcoder" | "refact" | "codeshell" | "command-r" | "exaone"
            | "minerva-7b" => {
                Sequence::new(vec![Digits::new(true).into(), byte_level.into()]).into()
            }
            other => return Err(TokenizerError::Pre(other.into())),
        };
        inner.with_pre_tokenizer(Some(pre_tok));
        inner.with_decoder(Some(ByteLevel::default()));
        let special: Vec<AddedToken> = tokens
            .iter()
            .enumerate()
            .filter(|(i, _)| matches!(types.get(*i), Some(3 | 4)))
            .map(|(_, t)| AddedToken::from(t.to_string(), true))
            .collect();
        inner.add_special_tokens(&special);
        let id = |k: &str| g.u64(k).ok().map(|x| x as u32);
        let bos = id("tokenizer.ggml.bos_token_id");
        let eos = id("tokenizer.ggml.eos_token_id");
        let add_bos = matches!(
            g.get("tokenizer.ggml.add_bos_token"),
            Some(crate::gguf::Value::Bool(true))
        );
        let text_of = |i: Option<u32>| {
            i.and_then(|i| tokens.get(i as usize))
                .map(|t| t.to_string())
                .unwrap_or_default()
        };
        let mut t = Self {
            bos_text: text_of(bos),
            eos_text: text_of(eos),
            inner,
            bos,
            eos,
            stop: Vec::new(),
            add_bos,
            chat_template: g.str("tokenizer.chat_template").ok().map(str::to_string),
        };
        t.stop = t.stop_tokens();
        Ok(t)
    }

    /// From a Hugging Face model folder: `tokenizer.json`, and `tokenizer_config.json` for the
    /// chat template and special tokens when present.
    pub fn from_hf_dir(dir: &Path) -> Result<Self, TokenizerError> {
        let inner = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).map_err(|e| {
            TokenizerError::Build(format!("{}: {e}", dir.join("tokenizer.json").display()))
        })?;
        let cfg: serde_json::Value = std::fs::read(dir.join("tokenizer_config.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        let token_text = |k: &str| match &cfg[k] {
            serde_json::Value::String(s) => Some(s.clone()),
            serde_json::Value::Object(o) => o
                .get("content")
                .and_then(|c| c.as_str())
                .map(str::to_string),
            _ => None,
        };
        let bos_text = token_text("bos_token").unwrap_or_default();
        let eos_text = token_text("eos_token").unwrap_or_default();
        let mut t = Self {
            bos: inner.token_to_id(&bos_text),
            eos: inner.token_to_id(&eos_text),
            add_bos: cfg["add_bos_token"].as_bool().unwrap_or(false),
            chat_template: cfg["chat_template"].as_str().map(str::to_string),
            inner,
            bos_text,
            eos_text,
            stop: Vec::new(),
        };
        t.stop = t.stop_tokens();
        Ok(t)
    }

    fn stop_tokens(&self) -> Vec<u32> {
        let mut v: Vec<u32> = self.eos.into_iter().collect();
        for s in ["<|im_end|>", "<|eot_id|>", "<|endoftext|>", "<|end|>"] {
            if let Some(i) = self.inner.token_to_id(s)
                && !v.contains(&i)
            {
                v.push(i);
            }
        }
        v
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Token ids of `text`; special tokens written in the text are recognised. No BOS.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        Ok(self
            .inner
            .encode(text, false)
            .map_err(build_err)?
            .get_ids()
            .to_vec())
    }

    /// The text of `ids` (special tokens included, so a worker's view reads back exactly).
    pub fn decode(&self, ids: &[u32]) -> String {
        self.inner.decode(ids, false).unwrap_or_default()
    }

    /// The text of one token as it would print in a stream (may be part of a UTF-8 character:
    /// use [`Self::decode`] over a run of tokens for display).
    pub fn token_text(&self, id: u32) -> String {
        self.decode(&[id])
    }

    /// The chat template applied to `messages` (the model's own template; ChatML when the
    /// model has none).
    pub fn render_chat(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<String, TokenizerError> {
        let chatml = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";
        let source = self.chat_template.as_deref().unwrap_or(chatml);
        let mut env = minijinja::Environment::new();
        env.add_function(
            "raise_exception",
            |msg: String| -> Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_template("chat", source)
            .map_err(|e| TokenizerError::Template(e.to_string()))?;
        env.get_template("chat")
            .and_then(|t| {
                t.render(minijinja::context! {
                    messages => messages,
                    add_generation_prompt => add_generation_prompt,
                    bos_token => self.bos_text.clone(),
                    eos_token => self.eos_text.clone(),
                })
            })
            .map_err(|e| TokenizerError::Template(e.to_string()))
    }
}
