//! Inference-job wire types: a peer starts a Hogwild! job on a node that serves a model, then
//! polls the job for its tokens (the RPC layer is one request, one answer; polling with an
//! offset streams the tokens and survives a lost answer), and may cancel it.

use serde::{Deserialize, Serialize};

/// Largest prompt a job may carry.
pub const MAX_INFER_PROMPT_BYTES: usize = 64 * 1024;
/// Most events one poll answer carries.
pub const MAX_EVENTS_PER_POLL: usize = 512;
/// Most workers of one job (the Hogwild! engine's limit).
pub const MAX_INFER_WORKERS: u8 = 8;

/// How tokens are chosen.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct InferSampling {
    /// 0 = greedy.
    pub temperature: f32,
    pub top_p: f32,
    pub seed: u64,
}

/// A job as a client asks for it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct InferJob {
    /// The conversation: (role, content) pairs, roles `system`, `user`, `assistant`; the last
    /// one is the user's question.
    pub messages: Vec<(String, String)>,
    /// Workers decoding together (1 = plain decoding).
    pub workers: u8,
    /// Tokens per worker.
    pub max_tokens: u32,
    pub sampling: InferSampling,
}

impl InferJob {
    /// Checks the limits every node applies before queueing; the error names the problem.
    pub fn validate(&self, max_tokens: u32) -> Result<(), String> {
        if self.workers == 0 || self.workers > MAX_INFER_WORKERS {
            return Err(format!(
                "workers must be 1 to {MAX_INFER_WORKERS}, not {}",
                self.workers
            ));
        }
        if self.max_tokens == 0 || self.max_tokens > max_tokens {
            return Err(format!(
                "max_tokens must be 1 to {max_tokens}, not {}",
                self.max_tokens
            ));
        }
        let bytes: usize = self.messages.iter().map(|(r, c)| r.len() + c.len()).sum();
        if bytes > MAX_INFER_PROMPT_BYTES {
            return Err(format!(
                "the messages hold {bytes} bytes, over the {MAX_INFER_PROMPT_BYTES}-byte limit"
            ));
        }
        match self.messages.last() {
            Some((role, content)) if role == "user" && !content.trim().is_empty() => {}
            Some((role, _)) if role != "user" => {
                return Err(format!("the last message must be the user's, not {role:?}"));
            }
            _ => return Err("the last message (the question) is empty".into()),
        }
        if let Some((role, _)) = self
            .messages
            .iter()
            .find(|(r, _)| !matches!(r.as_str(), "system" | "user" | "assistant"))
        {
            return Err(format!("unknown role {role:?} (system, user or assistant)"));
        }
        let s = self.sampling;
        if !(s.temperature.is_finite() && (0.0..=5.0).contains(&s.temperature)) {
            return Err(format!("temperature must be 0 to 5, not {}", s.temperature));
        }
        if !(s.top_p.is_finite() && s.top_p > 0.0 && s.top_p <= 1.0) {
            return Err(format!("top_p must be in (0, 1], not {}", s.top_p));
        }
        Ok(())
    }
}

/// What a job did, in order. Worker `w`'s text is the concatenation of its `Token`s.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum InferEvent {
    /// The job left the queue and started.
    Started,
    /// A piece of worker `worker`'s text.
    Token { worker: u8, text: String },
    /// The final answer (the finisher's, or the single worker's text).
    Answer { text: String },
    /// The job ended: tokens generated per worker and seconds of decoding.
    Done {
        generated: Vec<u32>,
        decode_seconds: f64,
        seconds: f64,
    },
    /// The job was cancelled (by its client, or the node stopped).
    Cancelled,
    /// The job failed; the reason names the problem.
    Failed(String),
}

impl InferEvent {
    /// Whether no event follows this one.
    pub fn is_last(&self) -> bool {
        matches!(self, Self::Done { .. } | Self::Cancelled | Self::Failed(_))
    }
}

/// Inference RPCs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum InferRequest {
    Start(InferJob),
    /// Events of `job` from index `from` on (at most [`MAX_EVENTS_PER_POLL`]).
    Poll {
        job: u64,
        from: u32,
    },
    Cancel {
        job: u64,
    },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum InferResponse {
    /// Queued; `ahead` jobs are before it.
    Started {
        job: u64,
        ahead: u32,
    },
    /// Events `[from, next)`; `done` when the last event is among them.
    Events {
        events: Vec<InferEvent>,
        next: u32,
        done: bool,
    },
    Cancelled,
    /// Not accepted: no model here, the queue is full, bad parameters, unknown job.
    Refused(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job() -> InferJob {
        InferJob {
            messages: vec![("user".into(), "What is 2+2?".into())],
            workers: 2,
            max_tokens: 64,
            sampling: InferSampling {
                temperature: 0.0,
                top_p: 1.0,
                seed: 0,
            },
        }
    }

    #[test]
    fn limits_name_the_problem() {
        assert!(job().validate(512).is_ok());
        let cases: Vec<(InferJob, &str)> = vec![
            (
                InferJob {
                    workers: 9,
                    ..job()
                },
                "workers",
            ),
            (
                InferJob {
                    workers: 0,
                    ..job()
                },
                "workers",
            ),
            (
                InferJob {
                    max_tokens: 0,
                    ..job()
                },
                "max_tokens",
            ),
            (
                InferJob {
                    max_tokens: 513,
                    ..job()
                },
                "max_tokens",
            ),
            (
                InferJob {
                    messages: vec![("user".into(), "x".repeat(MAX_INFER_PROMPT_BYTES + 1))],
                    ..job()
                },
                "limit",
            ),
            (
                InferJob {
                    messages: vec![],
                    ..job()
                },
                "empty",
            ),
            (
                InferJob {
                    messages: vec![("assistant".into(), "hi".into())],
                    ..job()
                },
                "last message",
            ),
            (
                InferJob {
                    messages: vec![("robot".into(), "a".into()), ("user".into(), "b".into())],
                    ..job()
                },
                "unknown role",
            ),
            (
                InferJob {
                    sampling: InferSampling {
                        temperature: f32::NAN,
                        ..job().sampling
                    },
                    ..job()
                },
                "temperature",
            ),
            (
                InferJob {
                    sampling: InferSampling {
                        top_p: 0.0,
                        ..job().sampling
                    },
                    ..job()
                },
                "top_p",
            ),
        ];
        for (j, word) in cases {
            let e = j.validate(512).unwrap_err();
            assert!(e.contains(word), "{e:?} should name {word}");
        }
    }

    #[test]
    fn events_round_trip() {
        let r = crate::Response::Infer(InferResponse::Events {
            events: vec![
                InferEvent::Started,
                InferEvent::Token {
                    worker: 1,
                    text: " four".into(),
                },
                InferEvent::Done {
                    generated: vec![3, 4],
                    decode_seconds: 0.5,
                    seconds: 0.7,
                },
            ],
            next: 3,
            done: true,
        });
        let b = r.to_bytes().unwrap();
        assert_eq!(crate::Response::from_bytes(&b).unwrap(), r);
    }
}
