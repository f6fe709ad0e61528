//! The request-response codec for peer RPC: one bincode message per stream direction,
//! bounded by [`MAX_RPC_BYTES`] and by a read deadline.
//!
//! libp2p's request-response drops read errors and read timeouts without telling the
//! application, so a peer could send garbage or hold streams open at no cost. This codec
//! therefore never fails a read on bad input: it yields [`Wire::Invalid`] with the reason,
//! which the actor answers with an error and counts against the peer.

use std::io;
use std::time::Duration;

use std::marker::PhantomData;

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
    /// How long a peer may take to send a whole message once the stream is open.
    pub read_timeout: Duration,
    _messages: PhantomData<fn() -> (Req, Resp)>,
}

impl<Req, Resp> Clone for Codec<Req, Resp> {
    fn clone(&self) -> Self {
        Self::new(self.read_timeout)
    }
}

impl<Req, Resp> Codec<Req, Resp> {
    pub fn new(read_timeout: Duration) -> Self {
        Self {
            read_timeout,
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

/// Reads the whole stream, refusing more than `limit` bytes or a stream that stalls.
async fn read_bounded<T: AsyncRead + Unpin + Send>(
    io: &mut T,
    timeout: Duration,
    limit: usize,
) -> io::Result<Read> {
    let mut buf = Vec::new();
    let mut limited = io.take(limit as u64 + 1);
    let read = tokio::time::timeout(timeout, limited.read_to_end(&mut buf)).await;
    match read {
        Err(_) => Ok(Read::Invalid(format!(
            "no complete message within {timeout:?} ({} bytes received)",
            buf.len()
        ))),
        Ok(Err(e)) => Err(e),
        Ok(Ok(_)) if buf.len() > limit => Ok(Read::Invalid(format!(
            "message exceeds the limit of {limit} bytes"
        ))),
        Ok(Ok(_)) => Ok(Read::Bytes(buf)),
    }
}

fn decode<T>(
    read: Read,
    f: impl FnOnce(&[u8]) -> Result<T, colony_protocol::CodecError>,
) -> Wire<T> {
    match read {
        Read::Invalid(why) => Wire::Invalid(why),
        Read::Bytes(b) => match f(&b) {
            Ok(v) => Wire::Valid(v),
            Err(e) => Wire::Invalid(e.to_string()),
        },
    }
}

async fn write<T: AsyncWrite + Unpin + Send>(
    io: &mut T,
    bytes: Result<Vec<u8>, colony_protocol::CodecError>,
) -> io::Result<()> {
    let bytes = bytes.map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
    io.write_all(&bytes).await?;
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
            read_bounded(io, self.read_timeout, Req::LIMIT).await?,
            Req::decode,
        ))
    }

    async fn read_response<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Wire<Resp>>
    where
        T: AsyncRead + Unpin + Send,
    {
        Ok(decode(
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
            Wire::Valid(r) => write(io, r.encode()).await,
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
            Wire::Valid(r) => write(io, r.encode()).await,
            Wire::Invalid(_) => Err(not_sendable()),
        }
    }
}
