//! Round-trip property tests for every wire type, and decoders against arbitrary bytes.
#![allow(clippy::unwrap_used)]

use colony_protocol::allreduce::{
    GroupCommit, GroupRequest, GroupResponse, PartAck, PartBody, PartMessage, RoundId, Scheme,
    WireAggregation, WireMode,
};
use colony_protocol::dht::{DhtEntry, DhtKey, Subkey};
use colony_protocol::identity::{NodeKeypair, NodePublicKey, Signature};
use colony_protocol::rpc::{NodeInfo, Request, Response, RpcError, RpcErrorCode, StoreOutcome};
use colony_protocol::{SignedEnvelope, decode, encode, names::MAX_RPC_BYTES};
use proptest::prelude::*;

fn key() -> impl Strategy<Value = DhtKey> {
    proptest::collection::vec("[A-Za-z0-9._-]{1,12}", 1..5)
        .prop_map(|segs| DhtKey::new(segs.join("/")).unwrap())
}

fn public_key() -> impl Strategy<Value = NodePublicKey> {
    any::<[u8; 32]>().prop_map(|s| NodeKeypair::from_secret(s).public())
}

fn subkey() -> impl Strategy<Value = Subkey> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..40).prop_map(Subkey::Plain),
        public_key().prop_map(Subkey::Owner),
    ]
}

fn entry() -> impl Strategy<Value = DhtEntry> {
    (
        key(),
        subkey(),
        proptest::collection::vec(any::<u8>(), 0..200),
        any::<u64>(),
        any::<Option<[u8; 32]>>(),
    )
        .prop_map(|(key, subkey, value, expires_at_ms, sig)| DhtEntry {
            key,
            subkey,
            value,
            expires_at_ms,
            signature: sig.map(|s| {
                let mut full = [0u8; 64];
                full[..32].copy_from_slice(&s);
                Signature(full)
            }),
        })
}

fn error_code() -> impl Strategy<Value = RpcErrorCode> {
    prop_oneof![
        Just(RpcErrorCode::BadRequest),
        Just(RpcErrorCode::TooLarge),
        Just(RpcErrorCode::Overloaded),
        Just(RpcErrorCode::Unavailable),
        Just(RpcErrorCode::Forbidden),
        Just(RpcErrorCode::Internal),
    ]
}

fn request() -> impl Strategy<Value = Request> {
    prop_oneof![
        (any::<u64>(), proptest::collection::vec(any::<u8>(), 0..64))
            .prop_map(|(nonce, payload)| Request::Ping { nonce, payload }),
        Just(Request::NodeInfo),
        proptest::collection::vec(entry(), 0..8).prop_map(|entries| Request::DhtStore { entries }),
        key().prop_map(|key| Request::DhtFind { key }),
        (proptest::collection::vec(any::<u8>(), 0..256), any::<u32>())
            .prop_map(|(payload, echo)| Request::Probe { payload, echo }),
        group_request().prop_map(Request::Group),
    ]
}

fn wire_mode() -> impl Strategy<Value = WireMode> {
    prop_oneof![
        Just(WireMode::Node),
        Just(WireMode::Client),
        Just(WireMode::Aux)
    ]
}

fn group_request() -> impl Strategy<Value = GroupRequest> {
    let commit = (
        "[a-z]{1,10}",
        any::<u64>(),
        any::<[u8; 16]>(),
        proptest::collection::vec(
            (
                proptest::collection::vec(any::<u8>(), 0..40),
                wire_mode(),
                0f64..1e6,
                any::<u64>(),
            ),
            0..6,
        ),
        any::<u64>(),
        scheme(),
        0f64..1e4,
        prop_oneof![
            Just(WireAggregation::Mean),
            (0.01f64..100.0, 1u32..50)
                .prop_map(|(tau, iters)| WireAggregation::CenteredClip { tau, iters }),
        ],
    )
        .prop_map(
            |(run, epoch, round, members, part_len, scheme, predicted_s, aggregation)| {
                GroupRequest::Commit(GroupCommit {
                    run,
                    epoch,
                    round: RoundId(round),
                    members: members.iter().map(|m| m.0.clone()).collect(),
                    modes: members.iter().map(|m| m.1).collect(),
                    weights: members.iter().map(|m| m.2).collect(),
                    shard_sizes: members.iter().map(|m| m.3).collect(),
                    part_len,
                    scheme,
                    aggregation,
                    predicted_s,
                })
            },
        );
    prop_oneof![
        ("[a-z]{1,10}", any::<u64>()).prop_map(|(run, epoch)| GroupRequest::Propose { run, epoch }),
        commit,
    ]
}

fn response() -> impl Strategy<Value = Response> {
    let outcome = prop_oneof![
        Just(StoreOutcome::Stored),
        Just(StoreOutcome::Outdated),
        ".{0,30}".prop_map(StoreOutcome::Refused),
    ];
    let info = (
        ".{0,20}",
        proptest::collection::vec("[a-z]{1,8}", 0..5),
        proptest::collection::vec(".{0,30}", 0..3),
        any::<bool>(),
        any::<u64>(),
    )
        .prop_map(
            |(agent, services, listen_addrs, reachable, uptime_s)| NodeInfo {
                agent,
                services,
                listen_addrs,
                reachable,
                uptime_s,
            },
        );
    prop_oneof![
        (any::<u64>(), proptest::collection::vec(any::<u8>(), 0..64))
            .prop_map(|(nonce, payload)| Response::Pong { nonce, payload }),
        info.prop_map(Response::NodeInfo),
        proptest::collection::vec(outcome, 0..8)
            .prop_map(|outcomes| Response::DhtStored { outcomes }),
        proptest::collection::vec(entry(), 0..8).prop_map(|entries| Response::DhtFound { entries }),
        (error_code(), ".{0,40}")
            .prop_map(|(code, message)| Response::Error(RpcError { code, message })),
        proptest::collection::vec(any::<u8>(), 0..256)
            .prop_map(|payload| Response::Probe { payload }),
        Just(Response::Group(GroupResponse::Accept)),
        ".{0,30}".prop_map(|why| Response::Group(GroupResponse::Decline(why))),
    ]
}

fn scheme() -> impl Strategy<Value = Scheme> {
    prop_oneof![
        Just(Scheme::F32),
        Just(Scheme::F16),
        (1u32..1024).prop_map(|block| Scheme::Int8Blockwise { block })
    ]
}

fn part_message() -> impl Strategy<Value = PartMessage> {
    let body = prop_oneof![
        (
            any::<u32>(),
            -1e6f64..1e6,
            scheme(),
            proptest::collection::vec(any::<u8>(), 0..256)
        )
            .prop_map(|(part, weight, scheme, data)| PartBody::Part {
                part,
                weight,
                scheme,
                data
            }),
        (
            any::<u32>(),
            scheme(),
            proptest::collection::vec(any::<u8>(), 0..256)
        )
            .prop_map(|(part, scheme, data)| PartBody::Result { part, scheme, data }),
        any::<u32>().prop_map(|part| PartBody::Unchanged { part }),
        proptest::collection::vec(any::<u32>(), 0..8)
            .prop_map(|failed| PartBody::Status { failed }),
    ];
    (any::<[u8; 16]>(), any::<u32>(), body).prop_map(|(r, from, body)| PartMessage {
        round: RoundId(r),
        from,
        body,
    })
}

proptest! {
    #[test]
    fn part_message_round_trips(m in part_message()) {
        prop_assert_eq!(PartMessage::from_bytes(&m.to_bytes().unwrap()).unwrap(), m);
    }

    #[test]
    fn part_ack_round_trips(reason in ".{0,40}", which in 0u8..3) {
        let ack = match which { 0 => PartAck::Ok, 1 => PartAck::UnknownRound, _ => PartAck::Refused(reason) };
        prop_assert_eq!(PartAck::from_bytes(&ack.to_bytes().unwrap()).unwrap(), ack);
    }

    #[test]
    fn part_decoders_survive_garbage(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = PartMessage::from_bytes(&bytes);
        let _ = PartAck::from_bytes(&bytes);
    }

    #[test]
    fn request_round_trips(req in request()) {
        let bytes = req.to_bytes().unwrap();
        prop_assert_eq!(Request::from_bytes(&bytes).unwrap(), req);
    }

    #[test]
    fn response_round_trips(resp in response()) {
        let bytes = resp.to_bytes().unwrap();
        prop_assert_eq!(Response::from_bytes(&bytes).unwrap(), resp);
    }

    #[test]
    fn entry_round_trips(e in entry()) {
        let bytes = encode(&e, MAX_RPC_BYTES).unwrap();
        prop_assert_eq!(decode::<DhtEntry>(&bytes, MAX_RPC_BYTES).unwrap(), e);
    }

    #[test]
    fn key_round_trips(k in key()) {
        let bytes = encode(&k, MAX_RPC_BYTES).unwrap();
        prop_assert_eq!(decode::<DhtKey>(&bytes, MAX_RPC_BYTES).unwrap(), k);
    }

    #[test]
    fn envelope_round_trips_and_verifies(secret in any::<[u8; 32]>(), domain in "[a-z/]{1,20}", ts in any::<u64>(), nonce in any::<u64>(), payload in proptest::collection::vec(any::<u8>(), 0..128)) {
        let kp = NodeKeypair::from_secret(secret);
        let env = SignedEnvelope::seal(&kp, &domain, ts, nonce, payload.clone());
        let back = SignedEnvelope::from_bytes(&env.to_bytes().unwrap()).unwrap();
        prop_assert_eq!(&back, &env);
        prop_assert_eq!(back.open(&domain).unwrap(), &payload[..]);
    }

    #[test]
    fn signed_entries_survive_the_wire(secret in any::<[u8; 32]>(), k in key(), value in proptest::collection::vec(any::<u8>(), 0..100)) {
        let now = 1_700_000_000_000u64;
        let e = DhtEntry::owned(k, &NodeKeypair::from_secret(secret), value, now + 1000);
        let back: DhtEntry = decode(&encode(&e, MAX_RPC_BYTES).unwrap(), MAX_RPC_BYTES).unwrap();
        prop_assert!(back.validate(now).is_ok());
    }

    /// Garbage never panics a decoder; it decodes or returns an error.
    #[test]
    fn decoders_survive_garbage(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = Request::from_bytes(&bytes);
        let _ = Response::from_bytes(&bytes);
        let _ = SignedEnvelope::from_bytes(&bytes);
        let _ = decode::<DhtEntry>(&bytes, MAX_RPC_BYTES);
    }

    /// Every strict prefix of a valid message is refused (truncation is detected).
    #[test]
    fn truncation_is_detected(req in request()) {
        let bytes = req.to_bytes().unwrap();
        for cut in 0..bytes.len() {
            prop_assert!(Request::from_bytes(&bytes[..cut]).is_err());
        }
    }
}

#[test]
fn keys_with_bad_characters_fail_to_decode() {
    // A hand-built message whose key string is not valid under the schema.
    let bytes = encode(&"run/has space".to_string(), MAX_RPC_BYTES).unwrap();
    let err = decode::<DhtKey>(&bytes, MAX_RPC_BYTES).unwrap_err();
    assert!(err.to_string().contains("bad dht key"), "{err}");
}
