//! The request-response codec for peer RPC: one bincode message per stream direction,
//! bounded by [`MAX_RPC_BYTES`] and by a read deadline that grows with the bytes received.
//!
//! libp2p's request-response drops read errors and read timeouts without telling the
//! application, so a peer could send garbage or hold streams open at no cost. This codec
//! therefore never fails a read on bad input: it yields [`Wire::Invalid`] with the reason,
//! which the actor answers with an error and counts against the peer.

use std::io;
use std::time::Duration;

use std::marker::PhantomData;
use std::sync::Arc;

use crate::telemetry::Counters;

use colony_protocol::allreduce::{PartAck, PartMessage};
use colony_protocol::names::{ALLREDUCE_PROTOCOL, MAX_PART_BYTES, MAX_RPC_BYTES, RPC_PROTOCOL};
use colony_protocol::{Request, Response};
use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use libp2p::StreamProtocol;

pub const PROTOCOL: StreamProtocol = StreamProtocol::new(RPC_PROTOCOL);
pub const PART_PROTOCOL: StreamProtocol = StreamProtocol::new(ALLREDUCE_PROTOCOL);

/// A message as read from a stream: decoded, or the reason it could not be.
#[derive(Clone, Debug)]
pub enum Wire<T> {
    Valid(T),
    Invalid(String),
}

/// A message type that travels on one of our request-response protocols.
pub trait WireMessage: Sized + Send + 'static {
    /// Largest encoded size accepted while reading.
    const LIMIT: usize;
    fn encode(&self) -> Result<Vec<u8>, colony_protocol::CodecError>;
    fn decode(bytes: &[u8]) -> Result<Self, colony_protocol::CodecError>;
}

macro_rules! wire_message {
    ($ty:ty, $limit:expr) => {
        impl WireMessage for $ty {
            const LIMIT: usize = $limit;
            fn encode(&self) -> Result<Vec<u8>, colony_protocol::CodecError> {
                self.to_bytes()
            }
            fn decode(bytes: &[u8]) -> Result<Self, colony_protocol::CodecError> {
                Self::from_bytes(bytes)
            }
        }
    };
}

wire_message!(Request, MAX_RPC_BYTES);
wire_message!(Response, MAX_RPC_BYTES);
wire_message!(PartMessage, MAX_PART_BYTES);
wire_message!(PartAck, 64 * 1024);

/// One bincode message per stream direction, bounded in size and time.
#[derive(Debug)]
pub struct Codec<Req, Resp> {
    /// How long a stream may go without a byte (and the base of the whole message's
    /// allowance, see [`read_bounded`]).
    pub read_timeout: Duration,
    /// Payload bytes read and written (the node's [`crate::telemetry::Traffic`]).
    counters: Arc<Counters>,
    _messages: PhantomData<fn() -> (Req, Resp)>,
}

impl<Req, Resp> Clone for Codec<Req, Resp> {
    fn clone(&self) -> Self {
        Self::new(self.read_timeout, self.counters.clone())
    }
}

impl<Req, Resp> Codec<Req, Resp> {
    pub fn new(read_timeout: Duration, counters: Arc<Counters>) -> Self {
        Self {
            read_timeout,
            counters,
            _messages: PhantomData,
        }
    }
}

/// Peer RPC.
pub type RpcCodec = Codec<Request, Response>;
/// All-reduce parts.
pub type PartCodec = Codec<PartMessage, PartAck>;

enum Read {
    Bytes(Vec<u8>),
    Invalid(String),
}

/// The slowest transfer a peer may hold a stream open with: 32 KiB/s (256 kbit/s, below any
/// volunteer's link). A message of `n` bytes may take `timeout + n / MIN_RATE`.
pub const MIN_RATE: u64 = 32 * 1024;

/// How long a whole message of at most `limit` bytes may take at [`MIN_RATE`]: the bound a
/// request-response timeout must leave room for.
pub fn max_transfer_time(timeout: Duration, limit: usize) -> Duration {
    timeout + Duration::from_secs_f64(limit as f64 / MIN_RATE as f64)
}

/// Reads the whole stream, refusing more than `limit` bytes or a stream that stalls: no
/// byte for `timeout`, or slower on the whole than `timeout` plus [`MIN_RATE`] per byte
/// received. A large message on a slow but steady link is read to the end (a 1 MiB chunk
/// at 5 Mbit/s with others in flight takes longer than any fixed deadline suited to small
/// messages); a peer that trickles bytes to hold the stream open is cut off.
async fn read_bounded<T: AsyncRead + Unpin + Send>(
    io: &mut T,
    timeout: Duration,
    limit: usize,
) -> io::Result<Read> {
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    let start = tokio::time::Instant::now();
    loop {
        let overall = start + timeout + Duration::from_secs_f64(buf.len() as f64 / MIN_RATE as f64);
        let asked = tokio::time::Instant::now();
        let until = overall.min(asked + timeout);
        let n = match tokio::time::timeout_at(until, io.read(&mut chunk)).await {
            Err(_) => {
                let why = if asked.elapsed() >= timeout {
                    "stalled"
                } else {
                    "slower than the minimum rate"
                };
                return Ok(Read::Invalid(format!(
                    "no complete message: {why} after {:.1?} ({} bytes received)",
                    start.elapsed(),
                    buf.len()
                )));
            }
            Ok(r) => r?,
        };
        if n == 0 {
            return Ok(Read::Bytes(buf));
        }
        if buf.len() + n > limit {
            return Ok(Read::Invalid(format!(
                "message exceeds the limit of {limit} bytes"
            )));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn decode<T>(
    counters: &Counters,
    read: Read,
    f: impl FnOnce(&[u8]) -> Result<T, colony_protocol::CodecError>,
) -> Wire<T> {
    match read {
        Read::Invalid(why) => Wire::Invalid(why),
        Read::Bytes(b) => {
            counters.received(b.len());
            match f(&b) {
                Ok(v) => Wire::Valid(v),
                Err(e) => Wire::Invalid(e.to_string()),
            }
        }
    }
}

async fn write<T: AsyncWrite + Unpin + Send>(
    counters: &Counters,
    io: &mut T,
    bytes: Result<Vec<u8>, colony_protocol::CodecError>,
) -> io::Result<()> {
    let bytes = bytes.map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
    io.write_all(&bytes).await?;
    counters.sent(bytes.len());
    io.close().await
}

fn not_sendable() -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        "an invalid message cannot be sent",
    )
}

impl<Req: WireMessage, Resp: WireMessage> libp2p::request_response::Codec for Codec<Req, Resp> {
    type Protocol = StreamProtocol;
    type Request = Wire<Req>;
    type Response = Wire<Resp>;

    async fn read_request<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Wire<Req>>
    where
        T: AsyncRead + Unpin + Send,
    {
        Ok(decode(
            &self.counters,
            read_bounded(io, self.read_timeout, Req::LIMIT).await?,
            Req::decode,
        ))
    }

    async fn read_response<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Wire<Resp>>
    where
        T: AsyncRead + Unpin + Send,
    {
        Ok(decode(
            &self.counters,
            read_bounded(io, self.read_timeout, Resp::LIMIT).await?,
            Resp::decode,
        ))
    }

    async fn write_request<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        req: Wire<Req>,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        match req {
            Wire::Valid(r) => write(&self.counters, io, r.encode()).await,
            Wire::Invalid(_) => Err(not_sendable()),
        }
    }

    async fn write_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        res: Wire<Resp>,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        match res {
            Wire::Valid(r) => write(&self.counters, io, r.encode()).await,
            Wire::Invalid(_) => Err(not_sendable()),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use futures::TryStreamExt;

    /// A stream that sends `chunks` pieces of `size` bytes, `gap` apart.
    fn paced(chunks: usize, size: usize, gap: Duration) -> impl AsyncRead + Unpin + Send {
        futures::stream::unfold(0usize, move |i| async move {
            if i == chunks {
                return None;
            }
            tokio::time::sleep(gap).await;
            Some((Ok::<_, io::Error>(vec![7u8; size]), i + 1))
        })
        .boxed()
        .into_async_read()
    }

    use futures::StreamExt;

    #[tokio::test]
    async fn a_slow_but_steady_message_is_read_past_the_timeout() {
        // 10 × 32 KiB, 100 ms apart: 1 s in all against a 300 ms timeout, 320 KiB/s.
        let mut io = paced(10, 32 * 1024, Duration::from_millis(100));
        match read_bounded(&mut io, Duration::from_millis(300), 1 << 20)
            .await
            .unwrap()
        {
            Read::Bytes(b) => assert_eq!(b.len(), 10 * 32 * 1024),
            Read::Invalid(why) => panic!("refused: {why}"),
        }
    }

    #[tokio::test]
    async fn a_stalled_or_trickling_stream_is_refused() {
        let mut silent = paced(1, 10, Duration::from_secs(5));
        match read_bounded(&mut silent, Duration::from_millis(200), 1 << 20)
            .await
            .unwrap()
        {
            Read::Invalid(why) => assert!(why.contains("stalled"), "{why}"),
            Read::Bytes(_) => panic!("a silent stream was accepted"),
        }
        // 16 bytes every 150 ms never stalls for the 200 ms timeout, but is far below the
        // minimum rate.
        let mut trickle = paced(100, 16, Duration::from_millis(150));
        match read_bounded(&mut trickle, Duration::from_millis(200), 1 << 20)
            .await
            .unwrap()
        {
            Read::Invalid(why) => assert!(why.contains("minimum rate"), "{why}"),
            Read::Bytes(_) => panic!("a trickle was accepted"),
        }
        let mut big = paced(3, 1024, Duration::ZERO);
        match read_bounded(&mut big, Duration::from_millis(200), 2000)
            .await
            .unwrap()
        {
            Read::Invalid(why) => assert!(why.contains("limit"), "{why}"),
            Read::Bytes(_) => panic!("an oversized message was accepted"),
        }
    }
}
