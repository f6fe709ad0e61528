//! The request-response codec for peer RPC: one bincode message per stream direction,
//! bounded by [`MAX_RPC_BYTES`] and by a read deadline.
//!
//! libp2p's request-response drops read errors and read timeouts without telling the
//! application, so a peer could send garbage or hold streams open at no cost. This codec
//! therefore never fails a read on bad input: it yields [`Wire::Invalid`] with the reason,
//! which the actor answers with an error and counts against the peer.

use std::io;
use std::time::Duration;

use colony_protocol::names::{MAX_RPC_BYTES, RPC_PROTOCOL};
use colony_protocol::{Request, Response};
use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use libp2p::StreamProtocol;

pub const PROTOCOL: StreamProtocol = StreamProtocol::new(RPC_PROTOCOL);

/// A message as read from a stream: decoded, or the reason it could not be.
#[derive(Clone, Debug)]
pub enum Wire<T> {
    Valid(T),
    Invalid(String),
}

#[derive(Clone, Debug)]
pub struct RpcCodec {
    /// How long a peer may take to send a whole message once the stream is open.
    pub read_timeout: Duration,
}

enum Read {
    Bytes(Vec<u8>),
    Invalid(String),
}

/// Reads the whole stream, refusing more than `MAX_RPC_BYTES` or a stream that stalls.
async fn read_bounded<T: AsyncRead + Unpin + Send>(
    io: &mut T,
    timeout: Duration,
) -> io::Result<Read> {
    let mut buf = Vec::new();
    let mut limited = io.take(MAX_RPC_BYTES as u64 + 1);
    let read = tokio::time::timeout(timeout, limited.read_to_end(&mut buf)).await;
    match read {
        Err(_) => Ok(Read::Invalid(format!(
            "no complete message within {timeout:?} ({} bytes received)",
            buf.len()
        ))),
        Ok(Err(e)) => Err(e),
        Ok(Ok(_)) if buf.len() > MAX_RPC_BYTES => Ok(Read::Invalid(format!(
            "message exceeds the limit of {MAX_RPC_BYTES} bytes"
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

impl libp2p::request_response::Codec for RpcCodec {
    type Protocol = StreamProtocol;
    type Request = Wire<Request>;
    type Response = Wire<Response>;

    async fn read_request<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Wire<Request>>
    where
        T: AsyncRead + Unpin + Send,
    {
        Ok(decode(
            read_bounded(io, self.read_timeout).await?,
            Request::from_bytes,
        ))
    }

    async fn read_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> io::Result<Wire<Response>>
    where
        T: AsyncRead + Unpin + Send,
    {
        Ok(decode(
            read_bounded(io, self.read_timeout).await?,
            Response::from_bytes,
        ))
    }

    async fn write_request<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        req: Wire<Request>,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        match req {
            Wire::Valid(r) => write(io, r.to_bytes()).await,
            Wire::Invalid(_) => Err(not_sendable()),
        }
    }

    async fn write_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        res: Wire<Response>,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        match res {
            Wire::Valid(r) => write(io, r.to_bytes()).await,
            Wire::Invalid(_) => Err(not_sendable()),
        }
    }
}
