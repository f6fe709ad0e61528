//! Reading a text corpus: a folder (recursively) of plain text, `fortune` files or JSONL.
//!
//! - `*.jsonl`: one JSON object per line with a string field `text`; one document per line.
//! - any other file that is UTF-8 text: documents are separated by lines holding only `%`
//!   (the `fortune` format) when the file has such lines, otherwise by blank lines.
//! - binary files (a NUL byte, or not UTF-8) are skipped and counted, never fatal: a corpus
//!   folder often holds index files (`fortune`'s `.dat`).

use std::path::{Path, PathBuf};

/// A corpus that could not be read.
#[derive(Debug, thiserror::Error)]
pub enum CorpusError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}:{line}: not a JSON object with a string field \"text\": {why}")]
    Jsonl {
        path: PathBuf,
        line: usize,
        why: String,
    },
    #[error("no text documents under {0}")]
    Empty(PathBuf),
}

/// Documents read from a corpus, each a list of sentences.
#[derive(Debug, Clone, Default)]
pub struct Corpus {
    pub documents: Vec<Vec<String>>,
    /// Files skipped as binary.
    pub skipped_files: usize,
    pub files: usize,
}

impl Corpus {
    /// Reads every file under `root` (a file or a folder), in path order so that every peer
    /// sees the same corpus the same way.
    pub fn read(root: &Path) -> Result<Self, CorpusError> {
        let mut files = Vec::new();
        collect(root, &mut files)?;
        // A file reached twice (fortune's `*.u8` links) is read once.
        let mut seen = std::collections::HashSet::new();
        files.retain(|f| seen.insert(std::fs::canonicalize(f).unwrap_or_else(|_| f.clone())));
        files.sort();
        let mut c = Corpus::default();
        for f in files {
            let bytes = std::fs::read(&f).map_err(|source| CorpusError::Io {
                path: f.clone(),
                source,
            })?;
            if bytes.contains(&0) {
                c.skipped_files += 1;
                continue;
            }
            let Ok(text) = String::from_utf8(bytes) else {
                c.skipped_files += 1;
                continue;
            };
            c.files += 1;
            if f.extension().is_some_and(|e| e == "jsonl") {
                for (i, line) in text.lines().enumerate() {
                    if line.trim().is_empty() {
                        continue;
                    }
                    let doc = jsonl_text(line).map_err(|why| CorpusError::Jsonl {
                        path: f.clone(),
                        line: i + 1,
                        why,
                    })?;
                    c.push(&doc);
                }
            } else {
                for doc in split_documents(&text) {
                    c.push(&doc);
                }
            }
        }
        if c.documents.is_empty() {
            return Err(CorpusError::Empty(root.to_path_buf()));
        }
        Ok(c)
    }

    /// A corpus from documents given in memory (tests, the demo's embedded text).
    pub fn from_documents<S: AsRef<str>>(docs: &[S]) -> Self {
        let mut c = Corpus::default();
        for d in docs {
            c.push(d.as_ref());
        }
        c
    }

    fn push(&mut self, doc: &str) {
        let sentences = split_sentences(doc);
        if !sentences.is_empty() {
            self.documents.push(sentences);
        }
    }

    /// Every document as one string (tokenizer training).
    pub fn texts(&self) -> impl Iterator<Item = String> + '_ {
        self.documents.iter().map(|d| d.join(" "))
    }
}

fn collect(p: &Path, out: &mut Vec<PathBuf>) -> Result<(), CorpusError> {
    let meta = std::fs::metadata(p).map_err(|source| CorpusError::Io {
        path: p.to_path_buf(),
        source,
    })?;
    if meta.is_file() {
        out.push(p.to_path_buf());
        return Ok(());
    }
    let rd = std::fs::read_dir(p).map_err(|source| CorpusError::Io {
        path: p.to_path_buf(),
        source,
    })?;
    for e in rd {
        let e = e.map_err(|source| CorpusError::Io {
            path: p.to_path_buf(),
            source,
        })?;
        let path = e.path();
        // Follow symlinks to files, but do not descend into linked folders (cycles).
        match std::fs::metadata(&path) {
            Ok(m) if m.is_file() => out.push(path),
            Ok(m) if m.is_dir() && !e.file_type().is_ok_and(|t| t.is_symlink()) => {
                collect(&path, out)?
            }
            _ => {}
        }
    }
    Ok(())
}

fn jsonl_text(line: &str) -> Result<String, String> {
    #[derive(serde::Deserialize)]
    struct Line {
        text: String,
    }
    serde_json::from_str::<Line>(line)
        .map(|l| l.text)
        .map_err(|e| e.to_string())
}

/// Documents of a text file: `%`-separated when the file has `%` lines, else paragraphs.
pub fn split_documents(text: &str) -> Vec<String> {
    let fortune = text.lines().any(|l| l.trim_end() == "%");
    let mut docs = Vec::new();
    let mut cur = String::new();
    for line in text.lines() {
        let sep = if fortune {
            line.trim_end() == "%"
        } else {
            line.trim().is_empty()
        };
        if sep {
            if !cur.trim().is_empty() {
                docs.push(std::mem::take(&mut cur));
            }
            cur.clear();
        } else {
            cur.push_str(line.trim());
            cur.push(' ');
        }
    }
    if !cur.trim().is_empty() {
        docs.push(cur);
    }
    docs
}

/// Sentences of a document: split after `.`, `!` or `?` followed by white space.
pub fn split_sentences(doc: &str) -> Vec<String> {
    let words: Vec<&str> = doc.split_whitespace().collect();
    let mut out = Vec::new();
    let mut cur: Vec<&str> = Vec::new();
    for w in words {
        cur.push(w);
        let end = w.trim_end_matches(['"', '\'', ')']);
        if end.ends_with(['.', '!', '?']) && end.len() > 1 {
            out.push(cur.join(" "));
            cur.clear();
        }
    }
    if !cur.is_empty() {
        out.push(cur.join(" "));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fortune_files_split_on_percent_lines_and_binaries_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("quotes"),
            "A stitch in time.\nSaves nine!\n%\nSecond one? Yes.\n%\n",
        )
        .unwrap();
        std::fs::write(dir.path().join("quotes.dat"), [0u8, 1, 2, 3]).unwrap();
        std::fs::write(
            dir.path().join("more.jsonl"),
            "{\"text\": \"From json. Two sentences.\"}\n\n",
        )
        .unwrap();
        let c = Corpus::read(dir.path()).unwrap();
        assert_eq!(c.skipped_files, 1);
        assert_eq!(c.documents.len(), 3);
        assert_eq!(c.documents[0], ["From json.", "Two sentences."]);
        assert_eq!(c.documents[1], ["A stitch in time.", "Saves nine!"]);
        assert_eq!(c.documents[2], ["Second one?", "Yes."]);
    }

    #[test]
    fn bad_jsonl_names_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("x.jsonl"),
            "{\"text\": \"ok\"}\n{\"txt\": 1}\n",
        )
        .unwrap();
        let e = Corpus::read(dir.path()).unwrap_err().to_string();
        assert!(e.contains("x.jsonl:2"), "{e}");
    }

    #[test]
    fn empty_folder_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            Corpus::read(dir.path()),
            Err(CorpusError::Empty(_))
        ));
    }
}
