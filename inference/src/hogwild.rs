//! The Hogwild! engine: N workers of one model decode as one batch over one shared block cache,
//! each seeing the others' tokens as they are written (`research/hogwild.md`).
//!
//! Blocks: the **common** history (the prompt, then every finished step of every worker in the
//! order they finished), an "others' work in progress" header, a separator that closes an
//! unfinished step, an "own work in progress" header, and one block per worker holding its
//! current, unfinished step. Worker w attends to
//!
//! ```text
//! common · others-header · (W_j · separator for every j ≠ w, ascending) · own-header · W_w
//! ```
//!
//! A step ends at a paragraph break after a finished sentence outside code or math. Then the
//! worker's block moves to the end of the common history (keys re-rotated once, by the history's
//! length) and the worker's next input is the token that ended the step followed by the next
//! step's header (`\n\n**Bob [3]:** `), and, every `interject_every` generated tokens, a question
//! asking the worker whether it is duplicating someone else's work. When any worker ends its
//! answer (a stop token) or the budget is spent, a **finisher** block sees everything and is
//! decoded greedily to give the final answer.
//!
//! One worker is plain decoding: the chat prompt, then the answer, no headers.

use std::time::Instant;

use burn::prelude::Backend;
use rand::{Rng, SeedableRng};

use crate::cache::{BlockId, BlockStore, Row, Segment};
use crate::cpu::CpuDecoder;
use crate::model::{Llama, to_vec};
use crate::tokenizer::{Message, Tokenizer};
use crate::weights::Config;

/// A model with a block cache: what the engine drives.
pub trait Decoder {
    fn config(&self) -> &Config;
    /// Tokens stored in block `b`.
    fn len(&self, b: BlockId) -> usize;
    /// One pass over `rows`; the logits of the rows whose indices are in `want`.
    fn forward(&mut self, rows: &[Row], want: &[usize]) -> Vec<Vec<f32>>;
    /// Appends block `from` to `to` and empties `from`.
    fn move_block(&mut self, from: BlockId, to: BlockId);
}

/// The burn model with one of the burn block stores.
#[derive(Debug)]
pub struct BurnDecoder<'m, B: Backend, C: BlockStore<B>> {
    pub model: &'m Llama<B>,
    pub cache: C,
}

impl<B: Backend, C: BlockStore<B>> Decoder for BurnDecoder<'_, B, C> {
    fn config(&self) -> &Config {
        &self.model.config
    }

    fn len(&self, b: BlockId) -> usize {
        self.cache.len(b)
    }

    fn forward(&mut self, rows: &[Row], want: &[usize]) -> Vec<Vec<f32>> {
        let tokens: Vec<u32> = rows.iter().map(|r| r.token).collect();
        self.cache.begin(rows);
        let hidden = self.model.hidden(&tokens, &mut self.cache);
        if want.is_empty() {
            return Vec::new();
        }
        let idx = burn::tensor::Tensor::<B, 1, burn::tensor::Int>::from_data(
            burn::tensor::TensorData::new(
                want.iter().map(|&r| r as i64).collect::<Vec<_>>(),
                [want.len()],
            ),
            self.model.device(),
        );
        let logits = to_vec(self.model.logits(hidden.select(0, idx)));
        logits
            .chunks_exact(self.model.config.vocab)
            .map(<[f32]>::to_vec)
            .collect()
    }

    fn move_block(&mut self, from: BlockId, to: BlockId) {
        self.cache.move_block(from, to, &self.model.rope);
    }
}

impl Decoder for CpuDecoder<'_> {
    fn config(&self) -> &Config {
        &self.model.config
    }

    fn len(&self, b: BlockId) -> usize {
        CpuDecoder::len(self, b)
    }

    fn forward(&mut self, rows: &[Row], want: &[usize]) -> Vec<Vec<f32>> {
        CpuDecoder::forward(self, rows, want)
    }

    fn move_block(&mut self, from: BlockId, to: BlockId) {
        CpuDecoder::move_block(self, from, to);
    }
}

pub const NAMES: [&str; 8] = [
    "Alice", "Bob", "Carol", "Dave", "Erin", "Frank", "Grace", "Heidi",
];

const COMMON: BlockId = 0;
const OTHERS: BlockId = 1;
const SEPARATOR: BlockId = 2;
const OWN: BlockId = 3;
const FIRST_WORKER: BlockId = 4;

/// How tokens are chosen.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Sampling {
    Greedy,
    /// Temperature, then nucleus (top-p) sampling, from a seeded generator.
    Random {
        temperature: f32,
        top_p: f32,
        seed: u64,
    },
}

impl Sampling {
    /// The usual knobs: temperature 0 (or below) is greedy decoding.
    pub fn from_temperature(temperature: f32, top_p: f32, seed: u64) -> Self {
        if temperature > 0.0 {
            Self::Random {
                temperature,
                top_p,
                seed,
            }
        } else {
            Self::Greedy
        }
    }
}

#[derive(Debug, Clone)]
pub struct HogwildConfig {
    /// 1 to 8.
    pub workers: usize,
    /// Tokens each worker may generate (forward passes), not counting the finisher.
    pub max_tokens: usize,
    pub sampling: Sampling,
    /// Ask "am I duplicating work?" at the next step start after this many generated tokens.
    pub interject_every: usize,
    /// Tokens the finisher may write.
    pub finisher_tokens: usize,
    /// The text that makes the finisher answer (after everything the workers wrote).
    pub finisher: String,
    /// Checked before every pass: once set, [`Engine::run`] stops (no finisher) and says so.
    pub cancel: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
}

impl Default for HogwildConfig {
    fn default() -> Self {
        Self {
            workers: 2,
            max_tokens: 256,
            sampling: Sampling::Greedy,
            interject_every: 1024,
            finisher_tokens: 64,
            finisher:
                "\n\nTime is up. Taking all of the work above into account, the final answer is:"
                    .into(),
            cancel: None,
        }
    }
}

/// The collaboration prompt (our wording of the method's instructions).
pub fn collaboration_prompt(workers: usize, question: &str) -> String {
    let names = NAMES[..workers].join(", ");
    format!(
        "# Working together\n\nYou are one of {workers} assistants ({names}) solving the same \
         problem at the same time. You all write at once and see each other's writing as it \
         appears.\n\nThe finished steps of everyone are collected under \"### Past steps\". \
         Under \"### Work in progress (others)\" you see what the others are writing right now, \
         unfinished; under \"### Work in progress (own)\" you continue your own current step.\n\n\
         Split the work: plan who does what, do different parts, check each other's results, \
         and say what you are doing so nobody does it twice. If you notice you are doing what \
         someone else has done or is doing, say so and switch to something else at once. Keep \
         steps short: one idea per paragraph.\n\n# The problem\n\n{question}"
    )
}

/// What happened, per worker and overall.
#[derive(Debug, Clone, Default)]
pub struct HogwildOutput {
    /// Each worker's whole text (all its steps, with their headers).
    pub workers: Vec<String>,
    /// The final answer (the finisher's text; with one worker, the answer itself).
    pub answer: String,
    /// Tokens generated per worker (sampled, not forced).
    pub generated: Vec<usize>,
    /// Forward passes of the workers.
    pub passes: usize,
    pub seconds: f64,
    /// Seconds spent in the workers' passes only (excluding prefill and finisher).
    pub decode_seconds: f64,
    /// Stopped by [`HogwildConfig::cancel`] (the answer is empty).
    pub cancelled: bool,
}

/// One worker's state.
#[derive(Debug, Clone, Default)]
struct Worker {
    /// Tokens to feed in the next pass.
    pending: Vec<u32>,
    /// Step number of the current step (1-based).
    step: usize,
    /// Every token this worker wrote (steps, headers), for its transcript.
    transcript: Vec<u32>,
    /// Text of the current step so far (for the step-boundary rule).
    step_text: String,
    generated: usize,
}

/// The engine over one decoder.
pub struct Engine<'a, D: Decoder> {
    pub dec: D,
    tok: &'a Tokenizer,
    cfg: HogwildConfig,
    workers: Vec<Worker>,
    rng: rand::rngs::StdRng,
    since_interjection: usize,
    interject_next: bool,
    passes: usize,
    /// Stop tokens (end of turn).
    stop: Vec<u32>,
}

impl<D: Decoder> std::fmt::Debug for Engine<'_, D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("workers", &self.cfg.workers)
            .field("passes", &self.passes)
            .finish()
    }
}

fn worker_block(w: usize) -> BlockId {
    FIRST_WORKER + w
}

/// Whether a step ends with `token_text` appended to `step_text`: a paragraph break completed by
/// this token (it may come as one token or as two newlines) right after a finished sentence,
/// with code fences and display maths closed.
pub fn ends_step(step_text: &str, token_text: &str) -> bool {
    let text = format!("{step_text}{token_text}");
    // From the step text's last character on (a break may start with its final newline).
    let mut from = step_text.len().saturating_sub(1);
    while !text.is_char_boundary(from) {
        from -= 1;
    }
    let Some(cut) = text[from..].find("\n\n").map(|i| i + from) else {
        return false;
    };
    let before = &text[..cut];
    let trimmed = before.trim_end_matches([' ', '\t', '*']);
    let sentence = trimmed.ends_with(['.', '?', '!', '。', '…', ':', ')']);
    let balanced = ["```", "~~~", "$$"]
        .iter()
        .all(|f| before.matches(f).count() % 2 == 0);
    sentence && balanced
}

impl<'a, D: Decoder> Engine<'a, D> {
    /// Sets up the blocks for `question` (prefilled) and the workers' first inputs.
    pub fn new(
        dec: D,
        tok: &'a Tokenizer,
        question: &str,
        cfg: HogwildConfig,
    ) -> anyhow::Result<Self> {
        Self::with_messages(dec, tok, &[Message::new("user", question)], cfg)
    }

    /// A conversation whose last message is the user's question. One worker decodes the
    /// conversation as the chat template lays it out; several workers get the system messages
    /// as they are and the earlier turns quoted before the question in the collaboration
    /// prompt.
    pub fn with_messages(
        dec: D,
        tok: &'a Tokenizer,
        messages: &[Message],
        cfg: HogwildConfig,
    ) -> anyhow::Result<Self> {
        let Some((last, earlier)) = messages.split_last() else {
            anyhow::bail!("no messages");
        };
        if last.role != "user" {
            anyhow::bail!("the last message must be the user's, not {:?}", last.role);
        }
        if !(1..=NAMES.len()).contains(&cfg.workers) {
            anyhow::bail!("workers must be 1 to {}, not {}", NAMES.len(), cfg.workers);
        }
        let seed = match cfg.sampling {
            Sampling::Random { seed, .. } => seed,
            Sampling::Greedy => 0,
        };
        let mut e = Self {
            dec,
            tok,
            workers: vec![Worker::default(); cfg.workers],
            rng: rand::rngs::StdRng::seed_from_u64(seed),
            since_interjection: 0,
            interject_next: false,
            passes: 0,
            stop: tok.stop.clone(),
            cfg,
        };
        let n = e.cfg.workers;
        if n == 1 {
            let prompt = tok.render_chat(messages, true)?;
            let ids = tok.encode(&prompt)?;
            let (last, head) = ids
                .split_last()
                .ok_or_else(|| anyhow::anyhow!("empty prompt"))?;
            e.prefill(COMMON, &[], head);
            e.workers[0].pending = vec![*last];
            e.workers[0].step = 1;
            return Ok(e);
        }
        let mut history = String::new();
        for m in earlier.iter().filter(|m| m.role != "system") {
            let who = if m.role == "assistant" {
                "Assistant"
            } else {
                "User"
            };
            history += &format!("{who}: {}\n\n", m.content);
        }
        let question = if history.is_empty() {
            last.content.clone()
        } else {
            format!(
                "Earlier in this conversation:\n\n{history}Now: {}",
                last.content
            )
        };
        let mut chat: Vec<Message> = earlier
            .iter()
            .filter(|m| m.role == "system")
            .cloned()
            .collect();
        chat.push(Message::new("user", &collaboration_prompt(n, &question)));
        let prompt = tok.render_chat(&chat, true)? + "### Past steps\n\n";
        e.prefill(COMMON, &[], &tok.encode(&prompt)?);
        let common = Segment {
            block: COMMON,
            visible: e.dec.len(COMMON),
        };
        e.prefill(
            OTHERS,
            &[common],
            &tok.encode("### Work in progress (others)\n\n")?,
        );
        let others = Segment {
            block: OTHERS,
            visible: e.dec.len(OTHERS),
        };
        e.prefill(SEPARATOR, &[common, others], &tok.encode(" <...>\n\n")?);
        e.prefill(
            OWN,
            &[common, others],
            &tok.encode("### Work in progress (own)\n\n")?,
        );
        for (w, (worker, name)) in e.workers.iter_mut().zip(NAMES).enumerate() {
            let first = if w == 0 {
                format!("**{name} [1]:** Hi, I'm {name}. Let's split this up:")
            } else {
                format!("**{name} [1]:** Hi, I'm {name}.")
            };
            worker.pending = tok.encode(&first)?;
            worker.step = 1;
        }
        Ok(e)
    }

    /// Tokens stored in block `b` (0: the common history; 4 + w: worker w's current step).
    pub fn cache_len(&self, b: BlockId) -> usize {
        self.dec.len(b)
    }

    /// Writes `tokens` into `block`, each attending to `context` and the block so far.
    fn prefill(&mut self, block: BlockId, context: &[Segment], tokens: &[u32]) {
        if tokens.is_empty() {
            return;
        }
        let base = self.dec.len(block);
        let rows: Vec<Row> = tokens
            .iter()
            .enumerate()
            .map(|(i, &t)| {
                let mut view = context.to_vec();
                view.push(Segment {
                    block,
                    visible: base + i + 1,
                });
                Row {
                    token: t,
                    write: block,
                    view,
                }
            })
            .collect();
        let _ = self.dec.forward(&rows, &[]);
    }

    /// Worker `w`'s view with `own` tokens of its own block visible; other blocks as long as
    /// they will be after this pass (`after[b]`).
    fn view(&self, w: usize, own: usize, after: &dyn Fn(BlockId) -> usize) -> Vec<Segment> {
        let seg = |block, visible| Segment { block, visible };
        if self.cfg.workers == 1 {
            return vec![seg(COMMON, after(COMMON)), seg(worker_block(0), own)];
        }
        let mut v = vec![seg(COMMON, after(COMMON)), seg(OTHERS, after(OTHERS))];
        for j in 0..self.cfg.workers {
            if j != w {
                v.push(seg(worker_block(j), after(worker_block(j))));
                v.push(seg(SEPARATOR, after(SEPARATOR)));
            }
        }
        v.push(seg(OWN, after(OWN)));
        v.push(seg(worker_block(w), own));
        v
    }

    /// One forward pass over every worker's pending tokens; returns each worker's logits at
    /// its last row (None for a worker with nothing pending).
    pub fn pass(&mut self) -> Vec<Option<Vec<f32>>> {
        let n = self.cfg.workers;
        let lens: Vec<usize> = (0..FIRST_WORKER + n).map(|b| self.dec.len(b)).collect();
        let mut after = lens.clone();
        for (w, wk) in self.workers.iter().enumerate() {
            after[worker_block(w)] += wk.pending.len();
        }
        let after_fn = |b: BlockId| after[b];
        let mut rows = Vec::new();
        let mut last_row = vec![None; n];
        for (w, wk) in self.workers.iter().enumerate() {
            let b = worker_block(w);
            for (i, &t) in wk.pending.iter().enumerate() {
                rows.push(Row {
                    token: t,
                    write: b,
                    view: self.view(w, lens[b] + i + 1, &after_fn),
                });
            }
            if !wk.pending.is_empty() {
                last_row[w] = Some(rows.len() - 1);
            }
        }
        if rows.is_empty() {
            return vec![None; n];
        }
        let picks: Vec<usize> = last_row.iter().flatten().copied().collect();
        let mut logits = self.dec.forward(&rows, &picks).into_iter();
        for wk in &mut self.workers {
            let fed = std::mem::take(&mut wk.pending);
            wk.transcript.extend(&fed);
        }
        self.passes += 1;
        last_row
            .iter()
            .map(|r| r.and_then(|_| logits.next()))
            .collect()
    }

    fn sample(&mut self, logits: &[f32]) -> u32 {
        match self.cfg.sampling {
            Sampling::Greedy => argmax(logits),
            Sampling::Random {
                temperature, top_p, ..
            } => {
                if temperature <= 0.0 {
                    return argmax(logits);
                }
                let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let mut p: Vec<(u32, f32)> = logits
                    .iter()
                    .enumerate()
                    .map(|(i, &l)| (i as u32, ((l - max) / temperature).exp()))
                    .collect();
                p.sort_unstable_by(|a, b| b.1.total_cmp(&a.1));
                let total: f32 = p.iter().map(|x| x.1).sum();
                let mut acc = 0.0;
                let mut keep = p.len();
                for (i, x) in p.iter().enumerate() {
                    acc += x.1 / total;
                    if acc >= top_p {
                        keep = i + 1;
                        break;
                    }
                }
                let kept = &p[..keep];
                let mass: f32 = kept.iter().map(|x| x.1).sum();
                let mut u = self.rng.r#gen::<f32>() * mass;
                for x in kept {
                    u -= x.1;
                    if u <= 0.0 {
                        return x.0;
                    }
                }
                kept[kept.len() - 1].0
            }
        }
    }

    /// Takes token `t` as worker `w`'s next: queues it, handling a step boundary. Returns
    /// whether the worker ended its answer.
    pub fn accept(&mut self, w: usize, t: u32) -> anyhow::Result<bool> {
        let n = self.cfg.workers;
        let wk = &mut self.workers[w];
        wk.generated += 1;
        self.since_interjection += 1;
        if self.since_interjection >= self.cfg.interject_every {
            self.interject_next = true;
        }
        if self.stop.contains(&t) {
            return Ok(true);
        }
        let text = self.tok.token_text(t);
        if n > 1 && ends_step(&wk.step_text, &text) {
            // The step is done: it joins the common history; the next starts with a header.
            let b = worker_block(w);
            self.dec.move_block(b, COMMON);
            wk.step += 1;
            let mut header = format!("**{} [{}]:** ", NAMES[w], wk.step);
            if self.interject_next {
                header
                    .push_str("Quick check: is someone already doing what I am doing? (yes/no): ");
                self.interject_next = false;
                self.since_interjection = 0;
            }
            wk.pending = vec![t];
            wk.pending.extend(self.tok.encode(&header)?);
            wk.step_text = header;
        } else {
            wk.step_text.push_str(&text);
            wk.pending = vec![t];
        }
        Ok(false)
    }

    /// Decodes until a worker ends its answer or the budget is spent, then runs the finisher.
    /// `on_token(worker, text)` sees each generated token as it is chosen.
    pub fn run(&mut self, on_token: &mut dyn FnMut(usize, &str)) -> anyhow::Result<HogwildOutput> {
        let t0 = Instant::now();
        let mut decode_s = 0.0;
        let mut finished = false;
        let mut cancelled = false;
        for _ in 0..self.cfg.max_tokens {
            if self
                .cfg
                .cancel
                .as_ref()
                .is_some_and(|c| c.load(std::sync::atomic::Ordering::Relaxed))
            {
                cancelled = true;
                break;
            }
            let t1 = Instant::now();
            let logits = self.pass();
            decode_s += t1.elapsed().as_secs_f64();
            for (w, l) in logits.into_iter().enumerate() {
                let Some(l) = l else { continue };
                let t = self.sample(&l);
                on_token(w, &self.tok.token_text(t));
                if self.accept(w, t)? {
                    finished = true;
                }
            }
            if finished {
                break;
            }
        }
        let answer = if cancelled {
            String::new()
        } else if self.cfg.workers == 1 {
            let ids: Vec<u32> = self.workers[0]
                .transcript
                .iter()
                .skip(1)
                .chain(&self.workers[0].pending)
                .copied()
                .filter(|t| !self.stop.contains(t))
                .collect();
            self.tok.decode(&ids)
        } else {
            self.finish()?
        };
        let workers = self
            .workers
            .iter()
            .map(|w| self.tok.decode(&w.transcript))
            .collect();
        Ok(HogwildOutput {
            workers,
            answer,
            generated: self.workers.iter().map(|w| w.generated).collect(),
            passes: self.passes,
            seconds: t0.elapsed().as_secs_f64(),
            decode_seconds: decode_s,
            cancelled,
        })
    }

    /// The final answer: a block that sees the history and everyone's current step.
    fn finish(&mut self) -> anyhow::Result<String> {
        let n = self.cfg.workers;
        let fin = FIRST_WORKER + n;
        // Flush the tokens still pending (they belong to the workers' text).
        if self.workers.iter().any(|w| !w.pending.is_empty()) {
            let _ = self.pass();
        }
        let mut context = vec![
            Segment {
                block: COMMON,
                visible: self.dec.len(COMMON),
            },
            Segment {
                block: OTHERS,
                visible: self.dec.len(OTHERS),
            },
        ];
        for w in 0..n {
            let b = worker_block(w);
            context.push(Segment {
                block: b,
                visible: self.dec.len(b),
            });
            context.push(Segment {
                block: SEPARATOR,
                visible: self.dec.len(SEPARATOR),
            });
        }
        let prompt = self.tok.encode(&self.cfg.finisher)?;
        let mut out = Vec::new();
        let mut feed = prompt;
        for _ in 0..self.cfg.finisher_tokens {
            let base = self.dec.len(fin);
            let rows: Vec<Row> = feed
                .iter()
                .enumerate()
                .map(|(i, &t)| {
                    let mut view = context.clone();
                    view.push(Segment {
                        block: fin,
                        visible: base + i + 1,
                    });
                    Row {
                        token: t,
                        write: fin,
                        view,
                    }
                })
                .collect();
            let last = rows.len() - 1;
            let logits = self.dec.forward(&rows, &[last]);
            let t = logits.first().map_or(0, |l| argmax(l));
            if self.stop.contains(&t) {
                break;
            }
            out.push(t);
            feed = vec![t];
        }
        Ok(self.tok.decode(&out).trim().to_string())
    }
}

pub fn argmax(v: &[f32]) -> u32 {
    v.iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map_or(0, |(i, _)| i as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_boundaries() {
        assert!(ends_step("We add 2 and 3.", "\n\n"));
        assert!(ends_step("Is it 5?", "\n\n"));
        assert!(!ends_step("We add 2 and", "\n\n"));
        assert!(!ends_step("We add.", " 2"));
        assert!(!ends_step("```\nlet x = 1;", "\n\n"));
        assert!(ends_step("```\nlet x = 1;\n```\nDone.", "\n\n"));
        assert!(!ends_step("$$ x = 1.", "\n\n"));
        assert!(ends_step("Check", ".\n\n"));
        // The break as two newline tokens.
        assert!(!ends_step("Done.", "\n"));
        assert!(ends_step("Done.\n", "\n"));
        // A break already inside the step text is not a new one.
        assert!(!ends_step("Done.\n\nMore", " words"));
        assert!(!ends_step("東京", "\n"));
        assert!(ends_step("東京。\n", "\n"));
    }
}
