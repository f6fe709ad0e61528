//! `colony infer`: Hogwild! inference on this machine, the workers' text shown live side by side
//! (on a terminal; a pipe gets each worker's transcript and the answer at the end).

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::bail;
use clap::Args;
use colony_inference::Precision;
use colony_inference::cpu::CpuDecoder;
use colony_inference::hogwild::{Engine, HogwildConfig, NAMES, Sampling};

#[derive(Debug, Args)]
pub struct InferArgs {
    /// A GGUF file or a Hugging Face folder (config.json, *.safetensors, tokenizer.json).
    #[arg(long)]
    pub model: PathBuf,
    /// The question.
    pub prompt: String,
    /// Workers decoding together (1 = plain decoding).
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
    /// Tokens per worker.
    #[arg(long, default_value_t = 256)]
    pub max_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    #[arg(long, default_value_t = 0.95)]
    pub top_p: f32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Ask the workers whether they duplicate work every this many tokens.
    #[arg(long, default_value_t = 1024)]
    pub interject_every: usize,
    /// Print JSON (transcripts, answer, timings) instead of text.
    #[arg(long)]
    pub json: bool,
    /// Multiply in f32 (dequantised weights, exact; several times slower) instead of on the
    /// quantised blocks with 8-bit activations.
    #[arg(long)]
    pub f32: bool,
}

impl InferArgs {
    fn precision(&self) -> Precision {
        if self.f32 {
            Precision::F32
        } else {
            Precision::Quantised
        }
    }
}

pub fn run(a: InferArgs) -> anyhow::Result<()> {
    if a.max_tokens == 0 {
        bail!("--max-tokens must be at least 1");
    }
    let t0 = Instant::now();
    let (model, tok) = colony_inference::load_cpu(&a.model, a.precision())?;
    let load_s = t0.elapsed().as_secs_f64();
    let cfg = HogwildConfig {
        workers: a.workers,
        max_tokens: a.max_tokens,
        sampling: Sampling::from_temperature(a.temperature, a.top_p, a.seed),
        interject_every: a.interject_every,
        ..HogwildConfig::default()
    };
    let mut engine = Engine::new(CpuDecoder::new(&model), &tok, &a.prompt, cfg)?;
    let live = std::io::stdout().is_terminal() && !a.json;
    let mut texts = vec![String::new(); a.workers];
    let mut last_draw = Instant::now() - Duration::from_secs(1);
    let out = engine.run(&mut |w, piece| {
        texts[w].push_str(piece);
        if live && last_draw.elapsed() > Duration::from_millis(100) {
            draw(&texts);
            last_draw = Instant::now();
        }
    })?;
    if live {
        draw(&texts);
    }
    let tokens: usize = out.generated.iter().sum();
    let tps = tokens as f64 / out.decode_seconds.max(1e-9);
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "model": a.model,
                "workers": out.workers,
                "answer": out.answer,
                "generated": out.generated,
                "passes": out.passes,
                "decode_seconds": out.decode_seconds,
                "seconds": out.seconds,
                "load_seconds": load_s,
                "tokens_per_second": tps,
            }))?
        );
        return Ok(());
    }
    if !live {
        for (w, t) in out.workers.iter().enumerate() {
            println!("── {} ──\n{t}\n", NAMES[w]);
        }
    }
    println!("\n── answer ──\n{}", out.answer);
    eprintln!(
        "{} workers · {tokens} tokens in {:.1} s of decoding ({tps:.1} tokens/s, {:.0} ms per pass) · model loaded in {load_s:.1} s",
        a.workers,
        out.decode_seconds,
        1e3 * out.decode_seconds / out.passes.max(1) as f64
    );
    Ok(())
}

/// Redraws the workers' texts as columns filling the terminal.
fn draw(texts: &[String]) {
    let (cols, rows) = terminal_size();
    let n = texts.len().max(1);
    let width = (cols.saturating_sub(n - 1) / n).max(10);
    let height = rows.saturating_sub(2).max(4);
    let wrapped: Vec<Vec<String>> = texts.iter().map(|t| wrap(t, width)).collect();
    let mut out = String::from("\x1b[H\x1b[2J");
    let header: Vec<String> = (0..n)
        .map(|w| format!("{:<width$}", format!("── {} ", NAMES[w]), width = width))
        .collect();
    out.push_str(&header.join("│"));
    out.push('\n');
    for r in 0..height {
        let line: Vec<String> = wrapped
            .iter()
            .map(|lines| {
                let skip = lines.len().saturating_sub(height);
                let s = lines.get(skip + r).map_or("", String::as_str);
                format!("{s:<width$}")
            })
            .collect();
        out.push_str(&line.join("│"));
        out.push('\n');
    }
    let mut so = std::io::stdout();
    let _ = so.write_all(out.as_bytes());
    let _ = so.flush();
}

fn terminal_size() -> (usize, usize) {
    let get = |k: &str, d: usize| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    (get("COLUMNS", 120), get("LINES", 40))
}

/// Wraps `text` into lines of at most `width` characters (hard breaks kept).
fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines = Vec::new();
    for para in text.split('\n') {
        let mut cur = String::new();
        for word in para.split(' ') {
            let need = cur.chars().count() + word.chars().count() + usize::from(!cur.is_empty());
            if need > width && !cur.is_empty() {
                lines.push(std::mem::take(&mut cur));
            }
            if !cur.is_empty() {
                cur.push(' ');
            }
            cur.push_str(word);
            while cur.chars().count() > width {
                let head: String = cur.chars().take(width).collect();
                cur = cur.chars().skip(width).collect();
                lines.push(head);
            }
        }
        lines.push(cur);
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrapping_keeps_words_and_breaks() {
        assert_eq!(wrap("ab cd ef", 5), ["ab cd", "ef"]);
        assert_eq!(wrap("a\n\nb", 5), ["a", "", "b"]);
        assert_eq!(wrap("abcdefghij", 4), ["abcd", "efgh", "ij"]);
    }
}
