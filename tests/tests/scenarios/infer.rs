//! Inference jobs served to the swarm, on the real SmolLM2-135M-Instruct GGUF
//! (`scripts/fetch-data.sh`): a peer streams a Hogwild! job over RPC and gets exactly what the
//! engine writes when run directly; `colony node --model` serves the OpenAI-compatible chat
//! API (streamed and not), refuses bad requests with a reason, bounds its queue, and cancels
//! a job on request or when its client hangs up.

use std::path::PathBuf;
use std::time::Duration;

use colony_daemon::infer_service::{InferLimits, InferService, remote_infer};
use colony_daemon::local::{LocalSwarm, LocalSwarmConfig};
use colony_inference::cpu::CpuDecoder;
use colony_inference::hogwild::{Engine, HogwildConfig};
use colony_inference::tokenizer::Message;
use colony_protocol::infer::{InferEvent, InferJob, InferRequest, InferResponse, InferSampling};
use colony_protocol::{Request, Response};
use colony_tests::process::NodeProcess;
use colony_tests::wait_for;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

const MODEL: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

fn model_path() -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../.cache/data")
        .join(MODEL);
    assert!(
        p.exists(),
        "{} is missing: run scripts/fetch-data.sh",
        p.display()
    );
    p
}

fn greedy() -> InferSampling {
    InferSampling {
        temperature: 0.0,
        top_p: 1.0,
        seed: 0,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_peer_streams_a_hogwild_job_and_gets_what_the_engine_writes() {
    colony_tests::init_tracing();
    let model = model_path();
    let svc = InferService::start(&model, InferLimits::default()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let swarm = LocalSwarm::start(
        dir.path(),
        LocalSwarmConfig {
            nodes: 3,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    swarm
        .wait_for_routing(2, Duration::from_secs(20))
        .await
        .unwrap();
    let server = swarm.nodes[0].peer_id();
    swarm.nodes[0]
        .handle
        .set_infer_handler(Some(svc.rpc_handler()))
        .await
        .unwrap();

    let question = "What is 12 times 7? Answer briefly.";
    let job = InferJob {
        messages: vec![("user".into(), question.into())],
        workers: 2,
        max_tokens: 12,
        sampling: greedy(),
    };
    let mut events = Vec::new();
    remote_infer(
        &swarm.nodes[1].handle,
        server,
        job.clone(),
        &CancellationToken::new(),
        &mut |e| events.push(e.clone()),
    )
    .await
    .unwrap();
    assert_eq!(events.first(), Some(&InferEvent::Started));
    assert!(
        matches!(events.last(), Some(InferEvent::Done { .. })),
        "{events:?}"
    );
    let mut streamed = vec![String::new(); 2];
    let mut answer = None;
    for e in &events {
        match e {
            InferEvent::Token { worker, text } => streamed[usize::from(*worker)].push_str(text),
            InferEvent::Answer { text } => answer = Some(text.clone()),
            _ => {}
        }
    }

    // The oracle: the engine run directly on the same model (as the service holds it: the
    // quantised blocks) and question.
    let (m, tok) =
        colony_inference::load_cpu(&model, colony_inference::Precision::Quantised).unwrap();
    let cfg = HogwildConfig {
        workers: 2,
        max_tokens: 12,
        finisher_tokens: 12,
        ..HogwildConfig::default()
    };
    let mut direct = vec![String::new(); 2];
    let mut engine = Engine::with_messages(
        CpuDecoder::new(&m),
        &tok,
        &[Message::new("user", question)],
        cfg,
    )
    .unwrap();
    let out = engine.run(&mut |w, t| direct[w].push_str(t)).unwrap();
    assert_eq!(streamed, direct, "the streamed tokens are the engine's");
    assert_eq!(answer.as_deref(), Some(out.answer.as_str()));
    assert!(!streamed[0].is_empty() && !streamed[1].is_empty());

    // Bad parameters are refused with the reason; another peer cannot read the job.
    let bad = InferJob {
        workers: 9,
        ..job.clone()
    };
    let e = remote_infer(
        &swarm.nodes[1].handle,
        server,
        bad,
        &CancellationToken::new(),
        &mut |_| {},
    )
    .await
    .unwrap_err();
    assert!(format!("{e:#}").contains("workers"), "{e:#}");
    let other = swarm.nodes[2]
        .handle
        .rpc_anywhere(
            server,
            Request::Infer(InferRequest::Poll { job: 0, from: 0 }),
        )
        .await
        .unwrap();
    match other {
        Response::Infer(InferResponse::Refused(why)) => {
            assert!(why.contains("another client"), "{why}")
        }
        other => panic!("another peer read the job: {other:?}"),
    }
    // A node without a model says so.
    let none = swarm.nodes[2]
        .handle
        .rpc_anywhere(
            swarm.nodes[1].peer_id(),
            Request::Infer(InferRequest::Start(job)),
        )
        .await
        .unwrap();
    assert!(
        matches!(&none, Response::Infer(InferResponse::Refused(w)) if w.contains("no model")),
        "{none:?}"
    );
    svc.stop();
    swarm.shutdown().await;
}

/// Reads an SSE body to its `[DONE]`: the JSON of every `data:` line.
async fn sse_events(mut resp: reqwest::Response) -> Vec<Value> {
    let mut buf = String::new();
    let mut out = Vec::new();
    while let Some(chunk) = resp.chunk().await.unwrap() {
        buf.push_str(std::str::from_utf8(&chunk).unwrap());
        while let Some(i) = buf.find("\n\n") {
            let event: String = buf.drain(..i + 2).collect();
            for line in event.lines() {
                if let Some(data) = line.strip_prefix("data: ") {
                    if data == "[DONE]" {
                        return out;
                    }
                    out.push(serde_json::from_str(data).unwrap());
                }
            }
        }
    }
    panic!("the stream ended without [DONE]: {out:?}");
}

async fn job_state(client: &reqwest::Client, api: &str, id: u64) -> Option<String> {
    let v: Value = client
        .get(format!("{api}/api/infer/jobs"))
        .send()
        .await
        .ok()?
        .json()
        .await
        .ok()?;
    v["jobs"]
        .as_array()?
        .iter()
        .find(|j| j["id"] == id)
        .and_then(|j| j["state"].as_str().map(str::to_string))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn colony_node_serves_chat_completions_streamed_and_not_with_a_bounded_queue() {
    let dir = tempfile::tempdir().unwrap();
    let model = model_path();
    let args: Vec<String> = [
        "--listen",
        "/ip4/127.0.0.1/udp/0/quic-v1",
        "--http",
        "127.0.0.1:0",
        "--model",
        model.to_str().unwrap(),
        "--infer-queue",
        "1",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut node = NodeProcess::start(&dir.path().join("n0"), &args, None).unwrap();
    let api = node.api();
    let client = reqwest::Client::new();
    let token = node.token();
    let post = |body: Value| {
        client
            .post(format!("{api}/v1/chat/completions"))
            .bearer_auth(&token)
            .json(&body)
            .send()
    };
    // Without the API key (the node's token) a completion is refused, with the reason.
    let r = client
        .post(format!("{api}/v1/chat/completions"))
        .json(&json!({ "messages": [{ "role": "user", "content": "hi" }] }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert!(r.text().await.unwrap().contains("api-token"));

    let models: Value = client
        .get(format!("{api}/v1/models"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(models["data"][0]["id"], MODEL, "{models}");

    // Not streamed, then streamed: greedy decoding gives the same answer.
    let ask = json!({
        "model": MODEL,
        "messages": [{ "role": "user", "content": "Name three primary colours." }],
        "max_tokens": 8,
        "temperature": 0,
        "hogwild_workers": 2,
    });
    let whole: Value = post(ask.clone()).await.unwrap().json().await.unwrap();
    let answer = whole["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(!answer.is_empty(), "{whole}");
    assert_eq!(whole["hogwild"]["workers"].as_array().unwrap().len(), 2);
    assert_eq!(whole["object"], "chat.completion");

    let mut streamed_ask = ask.clone();
    streamed_ask["stream"] = json!(true);
    let resp = post(streamed_ask).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let chunks = sse_events(resp).await;
    let mut deltas = String::new();
    let mut per_worker = [0usize; 2];
    let mut reason = None;
    let mut completion = 0;
    for c in &chunks {
        if let Some(n) = c["usage"]["completion_tokens"].as_u64() {
            completion = n as usize;
        }
        assert_eq!(c["object"], "chat.completion.chunk", "{c}");
        if let Some(h) = c.get("hogwild") {
            per_worker[h["worker"].as_u64().unwrap() as usize] += 1;
        }
        if let Some(choice) = c["choices"].get(0) {
            deltas += choice["delta"]["content"].as_str().unwrap_or("");
            if let Some(r) = choice["finish_reason"].as_str() {
                reason = Some(r.to_string());
            }
        }
    }
    assert_eq!(deltas, answer, "the streamed answer is the whole one");
    assert!(per_worker[0] > 0 && per_worker[1] > 0, "{per_worker:?}");
    assert_eq!(
        per_worker[0] + per_worker[1],
        completion,
        "every worker's tokens were streamed"
    );
    assert!(reason.is_some(), "the last chunk says why the answer ended");

    // One worker: plain decoding, its tokens are the answer's deltas.
    let mut one = ask.clone();
    one["hogwild_workers"] = json!(1);
    one["stream"] = json!(true);
    let chunks = sse_events(post(one).await.unwrap()).await;
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert!(!text.is_empty());
    assert!(chunks.iter().all(|c| c.get("hogwild").is_none()));

    // Bad requests name their problem.
    for (body, word) in [
        (json!({ "messages": [] }), "empty"),
        (
            json!({ "messages": [{ "role": "user", "content": "hi" }], "hogwild_workers": 9 }),
            "workers",
        ),
        (
            json!({ "messages": [{ "role": "user", "content": "hi" }], "max_tokens": 100000 }),
            "max_tokens",
        ),
        (json!({ "messages": "hi" }), "not a chat completion request"),
        (
            json!({ "model": "gpt-9", "messages": [{ "role": "user", "content": "hi" }] }),
            "serves",
        ),
    ] {
        let r = post(body.clone()).await.unwrap();
        let status = r.status();
        let v: Value = r.json().await.unwrap();
        assert!(status.is_client_error(), "{body} → {status} {v}");
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(msg.contains(word), "{body} → {msg}");
    }

    // The queue holds one job behind the running one; a third is refused; cancelling the
    // running job ends it and lets the queued one run.
    let long = json!({
        "messages": [{ "role": "user", "content": "Write a long story about a lighthouse." }],
        "max_tokens": 2000,
        "temperature": 0,
        "hogwild_workers": 2,
    });
    let running = tokio::spawn(post(long.clone()));
    wait_for("the long job to run", Duration::from_secs(30), || async {
        Ok((job_state(&client, &api, 3).await.as_deref() == Some("running")).then_some(()))
    })
    .await
    .unwrap();
    let queued = tokio::spawn(post(ask.clone()));
    wait_for(
        "the second job to queue",
        Duration::from_secs(10),
        || async {
            Ok((job_state(&client, &api, 4).await.as_deref() == Some("queued")).then_some(()))
        },
    )
    .await
    .unwrap();
    let refused = post(ask.clone()).await.unwrap();
    assert_eq!(refused.status(), 429);
    let cancel = client
        .delete(format!("{api}/api/infer/jobs/3"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(cancel.status(), 200);
    let r = running.await.unwrap().unwrap();
    assert_eq!(r.status(), 503, "the cancelled job says so");
    let q: Value = queued.await.unwrap().unwrap().json().await.unwrap();
    assert_eq!(q["choices"][0]["message"]["content"], answer);

    // A streaming client that hangs up cancels its job.
    let mut streamed_long = long.clone();
    streamed_long["stream"] = json!(true);
    let mut resp = post(streamed_long).await.unwrap();
    let _first = resp.chunk().await.unwrap();
    drop(resp);
    wait_for(
        "the abandoned job to be cancelled",
        Duration::from_secs(30),
        || async {
            Ok((job_state(&client, &api, 5).await.as_deref() == Some("cancelled")).then_some(()))
        },
    )
    .await
    .unwrap();
    node.terminate().unwrap();
}
